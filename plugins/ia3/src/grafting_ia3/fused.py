"""IA3 on a linear layer as one autograd node, the vector folded into the (small) weight.

Input scaling, ``y = (x ⊙ l)·Wᵀ + b = x·(W·diag(l))ᵀ + b``, scales the columns of ``W``
instead of the activation: no activation-sized product in forward, and backward gets
the vector's gradient, ``Σ_tokens x ⊙ (g·W)``, from the product the input gradient needs
anyway. Output scaling, ``y = l ⊙ (x·Wᵀ + b)``, keeps the (narrow) base output for the
vector's gradient and takes the input gradient through ``diag(l)·W`` or ``(g ⊙ l)·W``,
whichever is the smaller elementwise product. The vector is cast to the activation's
dtype (the mixed-precision default); its gradient comes back in its own dtype. The plain
composition (:meth:`IA3Adapter._scale` with ``fused = False``) is the reference these
are tested against.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def ia3_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, vector: torch.Tensor, scales_input: bool
) -> torch.Tensor:
    """The layer's output as plain ops (inference: no autograd node): the vector folded into ``W`` and ``b``."""
    scale = vector.to(x.dtype)
    if scales_input:
        return F.linear(x, weight * scale, bias)
    return F.linear(x, weight * scale[:, None], None if bias is None else bias * scale)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class IA3InputLinear(torch.autograd.Function):
    """``x·(W·diag(l))ᵀ + b`` for ``x`` (..., in), ``W`` (out, in), ``l`` (in,)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, vector: torch.Tensor
    ) -> torch.Tensor:
        scale = vector.to(x.dtype)
        ctx.save_for_backward(x, weight, scale)
        ctx.vector_dtype = vector.dtype
        return F.linear(x, weight * scale, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, scale = ctx.saved_tensors
        need_x, _, need_bias, need_vector = ctx.needs_input_grad
        g = _flat(grad)
        grad_x = grad_bias = grad_vector = None
        scaled_grad = g @ weight  # (tokens, in): the gradient of the scaled input x ⊙ l
        if need_bias:
            grad_bias = g.sum(0)
        if need_x:
            grad_x = (scaled_grad * scale).view(x.shape)
        if need_vector:  # Σ_tokens x ⊙ (g·W), reduced in float32 in one pass over the product
            grad_vector = scaled_grad.mul_(_flat(x)).sum(0, dtype=torch.float32).to(ctx.vector_dtype)
        return grad_x, None, grad_bias, grad_vector


class IA3OutputLinear(torch.autograd.Function):
    """``l ⊙ (x·Wᵀ + b)`` for ``x`` (..., in), ``W`` (out, in), ``l`` (out,)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, vector: torch.Tensor
    ) -> torch.Tensor:
        scale = vector.to(x.dtype)
        base = F.linear(x, weight, bias)
        ctx.save_for_backward(base, weight, scale)
        ctx.vector_dtype = vector.dtype
        ctx.x_shape = x.shape
        return base * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        base, weight, scale = ctx.saved_tensors
        need_x, _, need_bias, need_vector = ctx.needs_input_grad
        g = _flat(grad)
        grad_x = grad_bias = grad_vector = None
        if need_x:  # through diag(l)·W or g ⊙ l, whichever product is smaller
            narrow = weight.shape[1] < g.shape[0]
            grad_x = (g @ (weight * scale[:, None]) if narrow else (g * scale) @ weight).view(ctx.x_shape)
        if need_bias:
            grad_bias = g.sum(0) * scale
        if need_vector:
            grad_vector = (g * _flat(base)).sum(0, dtype=torch.float32).to(ctx.vector_dtype)
        return grad_x, None, grad_bias, grad_vector
