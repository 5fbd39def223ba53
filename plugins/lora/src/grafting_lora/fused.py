"""One autograd node for a frozen linear layer plus its LoRA delta, in the layer's half precision.

``y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ``: the low-rank product is accumulated into the base
output by ``addmm_`` in forward, and the input gradient of the adapter into the
base's input gradient in backward, so no elementwise pass over an activation is
left and the whole layer is one node for autograd to run. Weights of the adapter
stay in their own (float32) dtype: they are cast down for the products and their
gradients come back in their dtype. The plain composition
(:meth:`LoraLinear.add_delta` with ``fused = False``) is the reference it is tested
against.
"""

from __future__ import annotations

from typing import Any

import torch


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """The forward of :class:`LoraLinearFunction` as plain ops (no autograd node), for inference."""
    dtype = x.dtype
    flat = x.reshape(-1, x.shape[-1])
    low = flat @ lora_a.to(dtype).t()
    y = flat @ weight.t() if bias is None else torch.addmm(bias, flat, weight.t())
    y.addmm_(low, lora_b.to(dtype).t(), alpha=scaling)
    return y.view(*x.shape[:-1], y.shape[-1])


class LoraLinearFunction(torch.autograd.Function):
    """``x·Wᵀ + b + scaling·(x·Aᵀ)·Bᵀ`` for ``x`` (..., in), ``W`` (out, in), ``A`` (r, in), ``B`` (out, r)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        dtype = x.dtype
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        flat = x.reshape(-1, x.shape[-1])
        low = flat @ a.t()
        y = flat @ weight.t() if bias is None else torch.addmm(bias, flat, weight.t())
        y.addmm_(low, b.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, a, b, low)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        ctx.dtypes = (lora_a.dtype, lora_b.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, a, b, low = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        flat = x.reshape(-1, x.shape[-1])
        g = grad.reshape(-1, grad.shape[-1])
        grad_low = (g @ b).mul_(ctx.scaling)  # (tokens, r): small
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if need_x:
            grad_x = (g @ weight).addmm_(grad_low, a).view(x.shape)
        if need_w:
            grad_w = g.t() @ flat
        if need_bias and ctx.has_bias:
            grad_bias = g.sum(0)
        if need_a:
            grad_a = (grad_low.t() @ flat).to(ctx.dtypes[0])
        if need_b:
            grad_b = (g.t() @ low).mul_(ctx.scaling).to(ctx.dtypes[1])
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None
