"""What the virtual-token methods read from a model's config: layers, widths and attention heads."""

from __future__ import annotations

from typing import Any

from torch import nn

#: Config attribute names, in the order they are tried (transformers' and older spellings).
LAYERS = ("num_hidden_layers", "num_layers", "n_layer")
DECODER_LAYERS = ("num_decoder_layers", "decoder_layers")
WIDTH = ("hidden_size", "n_embd", "d_model")
HEADS = ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")


def text_config(model: nn.Module) -> Any:
    """The model's (text) config, or ``None`` for a model without one."""
    config = getattr(model, "config", None)
    if config is not None and callable(getattr(config, "get_text_config", None)):
        return config.get_text_config()
    return config


def read(config: Any, names: tuple[str, ...]) -> int | None:
    """The first of ``names`` that ``config`` sets, else ``None``."""
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def kv_geometry(config: Any, token_dim: int, heads: int) -> tuple[int, int] | None:
    """``(key/value heads, head width)`` of a model with grouped-query attention, else ``None``."""
    kv_heads = read(config, ("num_key_value_heads",))
    if kv_heads is None:
        return None
    head_dim = read(config, ("head_dim",)) or token_dim // heads
    return kv_heads, head_dim


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
