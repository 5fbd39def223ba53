"""Prefix tuning on the protocol: learned keys and values handed to the model as a pre-filled cache."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from grafting_prefix import calls
from grafting_prefix.base import VirtualTokenAdapter

METHOD = "prefix tuning"


class PrefixAdapter(VirtualTokenAdapter):
    """Supplies ``num_virtual_tokens`` key/value positions to every attention layer.

    The encoder's (tokens, layers·2·heads·head_dim) output is read as, per
    token, the keys then the values of each layer, head by head (PEFT's
    layout). forward and generate receive a transformers ``DynamicCache``
    holding them, and an attention mask with ones in front; the model
    counts positions after the prefix. A call that brings a non-empty cache
    continues it (the prefix is already there).
    """

    def __init__(self, encoder: nn.Module, *, layers: int, heads: int, head_dim: int, rows: int, device: Any) -> None:
        super().__init__(encoder, method=METHOD, rows=rows, width=layers * 2 * heads * head_dim, device=device)
        self.layers, self.heads, self.head_dim = layers, heads, head_dim

    def key_values(
        self, batch: int, dtype: torch.dtype, device: torch.device
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, keys and values of shape (batch, heads, num_virtual_tokens, head_dim)."""
        n = self.num_virtual_tokens
        flat = self.tokens().to(device=device, dtype=dtype)
        kv = flat.view(n, 2 * self.layers, self.heads, self.head_dim).permute(1, 2, 0, 3)
        kv = kv.unsqueeze(1).expand(-1, batch, -1, -1, -1)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(self.layers)]

    def _with_prefix(self, kwargs: dict[str, Any], model: nn.Module, *, generating: bool) -> dict[str, Any]:
        kwargs = dict(kwargs)
        batch, length, device = calls.input_shape(kwargs)
        n = self.num_virtual_tokens
        cache = calls.pop_cache(kwargs)
        if cache is None or not cache.get_seq_length():
            pairs = self.key_values(batch, calls.model_dtype(model, torch.float32), device)
            cache = _filled(cache, pairs, model)
        kwargs[calls.cache_argument(model) or calls.CACHE_NAMES[0]] = cache
        mask = kwargs.get("attention_mask")
        if mask is None and generating:  # generate must see the prefix in the mask to keep input_ids whole
            mask = torch.ones(batch, length, dtype=torch.long, device=device)
        if mask is not None:
            kwargs["attention_mask"] = calls.prefixed(mask, n, 1)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + n
        calls.drop(kwargs, "token_type_ids", METHOD)
        return kwargs

    def prepare(self, kwargs: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        return self._with_prefix(kwargs, model, generating=False)

    def prepare_generate(self, kwargs: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        if kwargs.get("input_ids") is None:
            raise ValueError(f"{METHOD}: generate needs input_ids (inputs_embeds alone are not supported)")
        return self._with_prefix(kwargs, model, generating=True)


def _filled(cache: Any, pairs: list[tuple[torch.Tensor, torch.Tensor]], model: nn.Module) -> Any:
    """``cache`` (an empty transformers cache, or ``None`` for a new DynamicCache) holding ``pairs``."""
    if cache is None:
        from transformers import DynamicCache

        return DynamicCache(pairs, config=getattr(model, "config", None))
    for i, (keys, values) in enumerate(pairs):
        cache.update(keys, values, i)
    return cache
