"""Dequantize and requantize the weights of bitsandbytes layers."""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from torch import nn


def is_quantized(layer: nn.Module) -> bool:
    return isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) and not layer.weight.is_floating_point()


def dequantize(layer: nn.Module) -> torch.Tensor:
    """The float32 (out, in) weight of a quantized bitsandbytes linear layer."""
    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    codes = weight.CB if weight.CB is not None else layer.state.CB
    scales = weight.SCB if weight.SCB is not None else layer.state.SCB
    return bnbf.int8_vectorwise_dequant(codes, scales).float()


@torch.no_grad()
def requantize(layer: nn.Module, matrix: torch.Tensor) -> None:
    """Quantize a float (out, in) matrix into the layer's weight, with the layer's own settings."""
    weight = layer.weight
    device = weight.device
    dense = matrix.detach().to("cpu", torch.float32).contiguous()
    if isinstance(layer, bnb.nn.Linear4bit):
        layer.weight = bnb.nn.Params4bit(
            dense,
            requires_grad=False,
            quant_type=weight.quant_type,
            blocksize=weight.blocksize,
            compress_statistics=weight.compress_statistics,
            quant_storage=weight.quant_storage,
        ).to(device)
    else:
        layer.weight = bnb.nn.Int8Params(dense, requires_grad=False, has_fp16_weights=False).to(device)
        layer.state.CB = None
        layer.state.SCB = None
