"""Base-layer weight layouts, so plugins can think of every weight as an (out, in) matrix."""

from __future__ import annotations

import torch
from torch import nn


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


def to_weight_layout(layer: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """Turn an (out, in·k) matrix into the layout of ``layer.weight``."""
    if is_hf_conv1d(layer) or isinstance(layer, nn.Embedding):
        return matrix.T
    return matrix.reshape(_weight(layer).shape)


@torch.no_grad()
def add_to_weight(layer: nn.Module, matrix: torch.Tensor, alpha: float = 1.0) -> None:
    """``weight += alpha * matrix`` in place, ``matrix`` given as (out, in·k)."""
    weight = _weight(layer)
    weight.add_(to_weight_layout(layer, matrix).to(weight.dtype), alpha=alpha)


def _weight(layer: nn.Module) -> torch.Tensor:
    weight = layer.weight
    assert isinstance(weight, torch.Tensor), f"{type(layer).__name__}.weight is not a tensor"
    return weight
