"""Quantize a model's linear layers in place (for tests, and CPU runs without a quantized checkpoint)."""

from __future__ import annotations

from collections.abc import Iterable

import bitsandbytes as bnb
import torch
from torch import nn


def _quantized_copy(linear: nn.Linear, bits: int, compute_dtype: torch.dtype) -> nn.Module:
    weight = linear.weight.detach().to("cpu", torch.float32)
    if bits == 4:
        layer: nn.Module = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype,
            quant_type="nf4",
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            has_fp16_weights=False,
            device="meta",
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to(linear.weight.device)


def quantize_linears(
    model: nn.Module, bits: int = 4, skip: Iterable[str] = ("lm_head",), compute_dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (but those whose name ends in ``skip``) by a bitsandbytes one."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    skipped = tuple(skip)
    names = [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not any(name == s or name.endswith("." + s) for s in skipped)
    ]
    for name in names:
        model.set_submodule(name, _quantized_copy(model.get_submodule(name), bits, compute_dtype))
    return model
