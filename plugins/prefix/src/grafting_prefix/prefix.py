"""Prefix tuning on the protocol: learned keys and values handed to the model as a pre-filled cache."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from grafting import UnsupportedLayerError
from grafting_prefix import attention, calls
from grafting_prefix.base import VirtualTokenAdapter

#: Tasks that keep token_type_ids (they type the real tokens; the prefix has none).
TOKEN_TYPES_KEPT = {"SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"}
#: Tasks of encoder-decoder models: the prefix goes to the decoder.
ENCODER_DECODER = {"SEQ_2_SEQ_LM"}

METHOD = "prefix tuning"


class PrefixAdapter(VirtualTokenAdapter):
    """Supplies ``num_virtual_tokens`` key/value positions to every attention layer.

    The encoder's (tokens, layers·2·heads·head_dim) output is read as, per
    token, the keys then the values of each layer, head by head (PEFT's
    layout). forward and generate receive a transformers ``DynamicCache``
    holding them, and an attention mask with ones in front; the model
    counts positions after the prefix. A call that brings a non-empty cache
    continues it (the prefix is already there).

    On an encoder-decoder model (``SEQ_2_SEQ_LM``) the prefix goes to the
    decoder's self-attention, in an ``EncoderDecoderCache`` whose
    cross-attention part is left empty, and ``decoder_attention_mask`` gets
    the ones; decoder layer ``j`` reads the keys and values of block
    ``(j · num_transformer_submodules) mod layers``, where PEFT puts them.
    ``token_type_ids`` are kept for classification and question answering
    (they type the real tokens), dropped otherwise, as PEFT does.

    A decoder-only model on SDPA runs the call with :mod:`grafting_prefix.attention`
    (causal attention over the prefix on SDPA's causal kernels instead of an
    explicit mask); :meth:`finish` gives the model its SDPA back.
    """

    #: ``False`` keeps the model's own attention (an explicit mask over the prefix): the reference.
    padded_attention: bool = True

    def __init__(
        self,
        encoder: nn.Module,
        *,
        layers: int,
        heads: int,
        head_dim: int,
        rows: int,
        device: Any,
        task_type: str = "CAUSAL_LM",
        submodules: int = 1,
    ) -> None:
        super().__init__(encoder, method=METHOD, rows=rows, width=layers * 2 * heads * head_dim, device=device)
        self.layers, self.heads, self.head_dim = layers, heads, head_dim
        self.task_type, self.submodules = task_type, submodules
        self._restore: str | None = None

    @property
    def seq2seq(self) -> bool:
        return self.task_type in ENCODER_DECODER

    def key_values(
        self, batch: int, dtype: torch.dtype, device: torch.device
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per (decoder) layer, keys and values of shape (batch, heads, num_virtual_tokens, head_dim)."""
        n = self.num_virtual_tokens
        flat = self.tokens().to(device=device, dtype=dtype)
        kv = flat.view(n, 2 * self.layers, self.heads, self.head_dim).permute(1, 2, 0, 3)
        kv = kv.unsqueeze(1).expand(-1, batch, -1, -1, -1)
        blocks = [(j * self.submodules) % self.layers if self.seq2seq else j for j in range(self.layers)]
        return [(kv[2 * b], kv[2 * b + 1]) for b in blocks]

    def _with_prefix(self, kwargs: dict[str, Any], model: nn.Module, *, generating: bool) -> dict[str, Any]:
        kwargs = dict(kwargs)
        batch, length, device = calls.input_shape(kwargs)
        n = self.num_virtual_tokens
        cache = calls.pop_cache(kwargs)
        if cache is None or not cache.get_seq_length():
            pairs = self.key_values(batch, calls.model_dtype(model, torch.float32), device)
            cache = _filled(cache, pairs, model, seq2seq=self.seq2seq)
        kwargs[calls.cache_argument(model) or calls.CACHE_NAMES[0]] = cache
        if calls.backbone_route(model) is not None:  # reaches the attention through **kwargs: checked after
            self.__dict__["_handed"] = (cache, cache.get_seq_length(), type(model).__name__)
        mask_name = "decoder_attention_mask" if self.seq2seq else "attention_mask"
        mask = kwargs.get(mask_name)
        if mask is None and generating and not self.seq2seq:  # generate must see the prefix to keep input_ids whole
            mask = torch.ones(batch, length, dtype=torch.long, device=device)
        if mask is not None:
            kwargs[mask_name] = calls.prefixed(mask, n, 1)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + n
        if self.task_type not in TOKEN_TYPES_KEPT:
            calls.drop(kwargs, "token_type_ids", METHOD)
        if self.padded_attention and not self.seq2seq and self._restore is None:
            self._restore = attention.switch_in(model)
            self.__dict__["_model"] = model  # a plain reference, not a submodule
        return kwargs

    def finish(self, outputs: Any, kwargs: dict[str, Any]) -> Any:
        if self._restore is not None:
            attention.switch_back(self.__dict__.pop("_model"), self._restore)
            self._restore = None
        handed = self.__dict__.pop("_handed", None)
        if handed is not None and handed[0].get_seq_length() <= handed[1]:
            raise UnsupportedLayerError(
                f"{METHOD}: {handed[2]} passed the prefix's cache on to its backbone, whose attention did not read"
                " it (the cache was not extended); the output would be the base model's"
            )
        return outputs

    def prepare(self, kwargs: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        return self._with_prefix(kwargs, model, generating=False)

    def prepare_generate(self, kwargs: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        if kwargs.get("input_ids") is None:
            raise ValueError(f"{METHOD}: generate needs input_ids (inputs_embeds alone are not supported)")
        return self._with_prefix(kwargs, model, generating=True)


def _filled(cache: Any, pairs: list[tuple[torch.Tensor, torch.Tensor]], model: nn.Module, *, seq2seq: bool) -> Any:
    """``cache`` (an empty transformers cache, or ``None`` for a new one) holding ``pairs``.

    For an encoder-decoder model the pairs fill the self-attention part of an
    ``EncoderDecoderCache``; its cross-attention part starts empty (the
    model fills it from the encoder's output).
    """
    from transformers import DynamicCache, EncoderDecoderCache

    config = getattr(model, "config", None)
    if cache is None:
        filled = DynamicCache(pairs, config=config)
        return EncoderDecoderCache(filled, DynamicCache(config=config)) if seq2seq else filled
    own = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
    for i, (keys, values) in enumerate(pairs):
        own.update(keys, values, i)
    return cache
