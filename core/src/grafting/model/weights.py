"""Base-layer weight layouts, so plugins can think of every weight as an (out, in) matrix.

Weights stored in a non-float form (quantized layers) are read and written
through the ``grafting_dense_weight`` / ``grafting_store_weight`` hooks, so a
plugin for a quantization library makes every method mergeable on its layers.
"""

from __future__ import annotations

import torch
from torch import nn

from grafting.errors import UnsupportedLayerError
from grafting.registry.plugins import get_registry


def is_hf_conv1d(layer: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer storing its weight as (in, out)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(layer, Conv1D)


def in_out_features(layer: nn.Module) -> tuple[int, int]:
    """(in, out) of a Linear, Conv1D, Embedding or ConvNd layer."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if is_hf_conv1d(layer):
        n_in, n_out = _weight(layer).shape
        return int(n_in), int(n_out)
    if isinstance(layer, nn.Embedding):
        return layer.num_embeddings, layer.embedding_dim
    if isinstance(layer, nn.modules.conv._ConvNd):
        return layer.in_channels, layer.out_channels
    raise TypeError(f"{type(layer).__name__} has no (in, out) weight layout grafting knows")


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The weight as an (out, in·k) matrix view (Conv1D transposed, Embedding as (dim, num))."""
    weight = _weight(layer)
    if is_hf_conv1d(layer) or isinstance(layer, nn.Embedding):
        return weight.T
    if isinstance(layer, nn.modules.conv._ConvNd):
        return weight.flatten(1)
    return weight


def plain_linear_weight(layer: nn.Module) -> torch.Tensor | None:
    """The (out, in) weight of a plain ``nn.Linear`` or transformers ``Conv1D`` without forward
    hooks, the layers whose call a fused kernel may replace; ``None`` for any other layer."""
    if layer._forward_hooks or layer._forward_pre_hooks:
        return None
    params = layer._parameters  # one dict read on the hot path (a DataParallel replica holds plain attributes)
    weight = params["weight"] if "weight" in params else getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    if type(layer) is nn.Linear:
        return weight
    return weight.t() if is_hf_conv1d(layer) else None


def to_weight_layout(layer: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """Turn an (out, in·k) matrix into the layout of ``layer.weight``."""
    if is_hf_conv1d(layer) or isinstance(layer, nn.Embedding):
        return matrix.T
    return matrix.reshape(_weight(layer).shape)


def is_float_weight(layer: nn.Module) -> bool:
    weight = getattr(layer, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.is_floating_point()


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The weight as a floating-point (out, in·k) matrix, dequantized if need be (do not modify it)."""
    if is_float_weight(layer):
        return weight_matrix(layer)

    dense = get_registry().hook.grafting_dense_weight(layer=layer)
    if dense is None:
        raise UnsupportedLayerError(_no_codec(layer))
    return dense


@torch.no_grad()
def store_weight(layer: nn.Module, matrix: torch.Tensor) -> None:
    """Set the weight from a floating-point (out, in·k) matrix, requantizing if need be."""
    if is_float_weight(layer):
        weight = _weight(layer)
        weight.copy_(to_weight_layout(layer, matrix).to(weight.dtype))
        return

    if not get_registry().hook.grafting_store_weight(layer=layer, matrix=matrix):
        raise UnsupportedLayerError(_no_codec(layer))


@torch.no_grad()
def add_to_weight(layer: nn.Module, matrix: torch.Tensor, alpha: float = 1.0) -> None:
    """``weight += alpha * matrix``, ``matrix`` given as (out, in·k); in place for float weights.

    The sum is computed in float32 (or the wider of the two dtypes) and rounded once into the weight's
    dtype: a bfloat16 weight is not rounded a first time by casting ``matrix`` to bfloat16 before the add.
    """
    if is_float_weight(layer):
        weight = _weight(layer)
        delta = to_weight_layout(layer, matrix)
        if weight.dtype in (torch.float32, torch.float64) and delta.dtype in (weight.dtype, torch.float32):
            weight.add_(delta.to(weight.dtype), alpha=alpha)  # one rounding already
            return
        wide = torch.promote_types(torch.promote_types(weight.dtype, delta.dtype), torch.float32)
        weight.copy_(torch.add(weight.to(wide), delta.to(device=weight.device, dtype=wide), alpha=alpha))
    else:
        dense = dense_weight(layer).float()
        store_weight(layer, dense + alpha * matrix.to(device=dense.device, dtype=dense.dtype))


def _no_codec(layer: nn.Module) -> str:
    weight = getattr(layer, "weight", None)
    kind = f"{type(weight).__name__} of {weight.dtype}" if isinstance(weight, torch.Tensor) else "no weight tensor"
    return (
        f"{type(layer).__name__} stores its weight as {kind}; no installed plugin can read or write it "
        "(for bitsandbytes layers, install grafting-bnb)"
    )


def _weight(layer: nn.Module) -> torch.Tensor:
    weight = layer.weight
    assert isinstance(weight, torch.Tensor), f"{type(layer).__name__}.weight is not a tensor"
    return weight
