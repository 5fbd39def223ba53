"""The grafting-bnb plugin: the weight codec hooks for bitsandbytes layers."""

from __future__ import annotations

import torch
from torch import nn

from grafting import hookimpl
from grafting_bnb.codec import dequantize, is_quantized, requantize


@hookimpl
def grafting_dense_weight(layer: nn.Module) -> torch.Tensor | None:
    return dequantize(layer) if is_quantized(layer) else None


@hookimpl
def grafting_store_weight(layer: nn.Module, matrix: torch.Tensor) -> bool | None:
    if not is_quantized(layer):
        return None
    requantize(layer, matrix)
    return True
