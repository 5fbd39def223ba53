"""Causal attention over a prefix on SDPA's fast kernels: the queries padded to the keys' length.

With ``n`` prefix keys in front, query ``i`` sees keys ``0 .. n + i`` (causal,
aligned to the bottom right). SDPA's ``is_causal`` aligns to the top left, so
transformers builds an explicit (batch, 1, q, n + q) mask for it, and a masked
SDPA call runs about twice as slow as a causal one (fwd+bwd, one H200, Llama 1B
shapes). Padding the queries with ``n`` zero rows in front makes the two
alignments agree: ``is_causal`` computes exactly the masked attention for the
real rows, and the padded rows are dropped.

:data:`NAME` is registered with transformers' attention and mask interfaces; it
is SDPA everywhere else (a padding mask, one query, no prefix). The prefix
adapter switches a model from ``"sdpa"`` to it for the length of a call.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

NAME = "grafting_prefix_sdpa"
_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, prefix_sdpa_attention)
    AttentionMaskInterface.register(NAME, prefix_sdpa_mask)
    _registered = True


def prefix_sdpa_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' SDPA mask, or ``None`` for a plain causal mask after cached keys (no padding)."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    q_length, kv_length = kwargs.get("q_length"), kwargs.get("kv_length")
    padding = kwargs.get("attention_mask")
    plain = (
        not args
        and kwargs.get("allow_is_causal_skip", True)
        and kwargs.get("mask_function") is causal_mask_function
        and kwargs.get("local_size") is None
        and kwargs.get("kv_offset", 0) == 0
        and isinstance(q_length, int)
        and isinstance(kv_length, int)
        and 1 < q_length < kv_length
        and kwargs.get("q_offset") == kv_length - q_length
        and not torch.compiler.is_compiling()
        and (padding is None or bool(padding.all()))
    )
    return None if plain else sdpa_mask(*args, **kwargs)


def prefix_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """SDPA; without a mask and with fewer queries than keys, causal over the padded queries."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    extra = key.shape[2] - query.shape[2]
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    plain = attention_mask is not None or kwargs.get("position_bias") is not None
    if plain or extra <= 0 or query.shape[2] == 1 or not causal:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    padded = torch.cat([query.new_zeros(*query.shape[:2], extra, query.shape[3]), query], dim=2)
    out, weights = sdpa_attention_forward(module, padded, key, value, None, **kwargs)
    return out[:, extra:], weights  # (batch, queries, heads, head_dim): the padded rows dropped


def switch_in(model: nn.Module) -> str | None:
    """Give ``model`` the padded-query attention if it runs SDPA; the implementation to restore, or ``None``."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return None
    if getattr(config, "sub_configs", None):  # the setter would rewrite every sub-config's choice too
        return None
    _register()
    config._attn_implementation = NAME
    return "sdpa"


def switch_back(model: nn.Module, previous: str | None) -> None:
    if previous is not None:
        model.config._attn_implementation = previous  # type: ignore[union-attr]
