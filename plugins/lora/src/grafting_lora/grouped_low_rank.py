"""``(x·L)·(R·s)`` over the groups of ``torch._grouped_mm`` as one autograd node: the low-rank half of an
expert tensor's grouped product (:mod:`grafting_lora.low_rank_weight`).

Through plain autograd the same product costs, besides its four skinny grouped GEMMs, a cast of ``L``; a
scaling, a cast and a relayout of ``R`` (the adapter's ``lora_B`` puts expert ``e`` in columns ``e, e+E, …``:
no layout a grouped kernel takes); and in backward the same again for both gradients. Here each factor is
cast (and scaled) straight into a layout the kernel takes, in one pass, and each gradient is written in one
pass into its factor's own layout and dtype, so autograd's view backward and the gradient accumulation copy
nothing: two elementwise passes in forward and two in backward where there were eight. The values are the
plain path's to the bit (``L`` in the compute dtype, ``R·s`` formed in ``R``'s dtype then cast; gradients
cast to the factor's dtype, ``R``'s then scaled).
"""

from __future__ import annotations

from typing import Any

import torch

#: per (scaling, dtype, device): the scaling as a 0-dim tensor (see :func:`_scaled_into`)
_scales: dict[tuple[float, torch.dtype, torch.device], torch.Tensor] = {}


def takes(matrix: torch.Tensor) -> bool:
    """Whether grouped GEMM kernels take ``matrix`` (…, k, n) as it is: one of its last two dims contiguous,
    the other's stride a multiple of 16 bytes, the data 16-byte aligned."""
    align = 16 // matrix.element_size()
    stride, size = matrix.stride(), matrix.shape
    if matrix.data_ptr() % 16:
        return False
    if stride[-1] == 1 and stride[-2] >= max(1, size[-1]) and stride[-2] % align == 0:
        return True
    return stride[-2] == 1 and stride[-1] >= max(1, size[-2]) and stride[-1] % align == 0


def operand(matrix: torch.Tensor, dtype: torch.dtype, scaling: float | None = None) -> torch.Tensor:
    """``matrix`` (times ``scaling``, formed in ``matrix``'s dtype) in ``dtype``, laid out as grouped kernels take
    it, in one pass; ``matrix`` itself when it already is and nothing is to be done."""
    if scaling is None and matrix.dtype == dtype and takes(matrix):
        return matrix
    out = torch.empty_like(matrix, dtype=dtype)  # matrix's own strides where it is dense: a sequential pass
    if not takes(out):  # row-major, or column-major where the rows are too narrow (rank 4 in bf16)
        out = torch.empty(matrix.shape, dtype=dtype, device=matrix.device)
        if matrix.shape[-1] % (16 // out.element_size()):
            out = torch.empty_like(matrix.mT, dtype=dtype, memory_format=torch.contiguous_format).mT
    if scaling is None or scaling == 1:
        return out.copy_(matrix)
    return torch.mul(matrix, scaling, out=out)


def _scaled_into(grad: torch.Tensor, like: torch.Tensor, scaling: float) -> torch.Tensor:
    """``grad`` cast to ``like``'s dtype, then times ``scaling`` (in that dtype), written in ``like``'s layout: one pass.

    The scaling goes in as a tensor of ``like``'s dtype expanded to ``grad``'s shape, so the product is
    formed in ``like``'s dtype whatever ``grad``'s (a Python number would leave it in ``grad``'s)."""
    key = (scaling, like.dtype, like.device)
    scale = _scales.get(key)
    if scale is None:
        scale = _scales[key] = torch.tensor(scaling, dtype=like.dtype, device=like.device)
    return torch.mul(grad, scale.expand(grad.shape), out=torch.empty_like(like))


def _cast_into(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``grad`` in ``like``'s dtype and layout (one pass; ``grad`` itself when its dtype already is ``like``'s)."""
    return grad if grad.dtype == like.dtype else torch.empty_like(like).copy_(grad)


class GroupedLowRankFunction(torch.autograd.Function):
    """``_grouped_mm(_grouped_mm(x, L, offs), R·s, offs)`` with ``L`` (E, k, r), ``R`` (E, r, n) in any dtype and
    layout, the products in ``dtype`` (``x``'s). Gradients reach ``x``, ``L`` and ``R`` (each in its own dtype)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        left: torch.Tensor,
        right: torch.Tensor,
        offs: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        low_left, low_right = operand(left, x.dtype), operand(right, x.dtype, scaling)
        h = torch._grouped_mm(x, low_left, offs=offs)
        ctx.save_for_backward(x, h, low_left, low_right, offs)
        ctx.factors = (left.detach(), right.detach())  # for their dtype and layout only
        ctx.scaling = scaling
        return torch._grouped_mm(h, low_right, offs=offs)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, h, low_left, low_right, offs = ctx.saved_tensors
        left, right = ctx.factors
        need_x, need_left, need_right = ctx.needs_input_grad[:3]
        grad_x = grad_left = grad_right = None
        grad_h = torch._grouped_mm(grad, low_right.mT, offs=offs) if need_x or need_left else None
        if need_x:
            grad_x = torch._grouped_mm(grad_h, low_left.mT, offs=offs)
        if need_left:
            grad_left = _cast_into(torch._grouped_mm(x.mT, grad_h, offs=offs), left)
        if need_right:
            grad_right = _scaled_into(torch._grouped_mm(h.mT, grad, offs=offs), right, ctx.scaling)
        return grad_x, grad_left, grad_right, None, None


def grouped_low_rank(
    x: torch.Tensor, left: torch.Tensor, right: torch.Tensor, offs: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``(x·L)·(R·s)`` over the groups ``offs``, in ``x``'s dtype: one autograd node where gradients are wanted."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, left, right)):
        return GroupedLowRankFunction.apply(x, left, right, offs, scaling)
    h = torch._grouped_mm(x, operand(left, x.dtype), offs=offs)
    return torch._grouped_mm(h, operand(right, x.dtype, scaling), offs=offs)
