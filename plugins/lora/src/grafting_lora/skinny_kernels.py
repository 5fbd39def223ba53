"""One pass over the output gradient for both of LoRA's backward products that read it (Triton, CUDA).

LoRA's backward reads the layer's output gradient ``g`` (tokens, out) twice: for the low-rank
product's gradient ``s·g·B`` (tokens, r) and for B's gradient ``s·gᵀ·low`` (out, r). Both are
skinny, so each is a pass over ``g`` bound by memory. :func:`output_grad_products` computes the two
in one pass: each program takes a block of rows of ``g``, walks its columns, accumulates its rows
of ``s·g·B`` in registers and adds its share of ``s·gᵀ·low`` into a float32 ``B``-gradient with
atomics -- which is also the adapter's own dtype in the default setup, so no cast follows.

Where Triton or a CUDA device is missing, or the sizes do not suit the kernel, the same values come
from two matmuls (:func:`output_grad_products_reference`). The kernel sums in a different order,
so its results equal the reference's up to rounding (float32 accumulation in both).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

#: The rank the kernel handles at most (the (rows, r) accumulator lives in registers).
MAX_RANK = 128

#: Block sizes and launch options of the kernel (rows of ``g`` per program, columns per step).
LAUNCH: dict[str, int] = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}


def output_grad_products_reference(
    g: torch.Tensor, b: torch.Tensor, low: torch.Tensor, scaling: float, b_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s·g·B, s·gᵀ·low)``: the low product's gradient in ``g``'s dtype, B's in ``b_dtype``; two matmuls."""
    grad_low = g @ b
    grad_b = g.t() @ low
    if scaling != 1.0:
        grad_low.mul_(scaling)
        grad_b.mul_(scaling)
    return grad_low, grad_b.to(b_dtype)


def output_grad_products(
    g: torch.Tensor, b: torch.Tensor, low: torch.Tensor, scaling: float, b_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s·g·B, s·gᵀ·low)`` for ``g`` (tokens, out), ``B`` (out, r), ``low`` (tokens, r), one pass over ``g``.

    ``b`` and ``low`` are in ``g``'s half precision; the first result is too, the second is in ``b_dtype``.
    """
    if not _kernel_applies(g, b, low):
        return output_grad_products_reference(g, b, low, scaling, b_dtype)
    return _launch(g, b, low, scaling, b_dtype)


def _kernel_applies(g: torch.Tensor, b: torch.Tensor, low: torch.Tensor) -> bool:
    if not (g.is_cuda or _interpreting()) or _kernels() is None:
        return False
    if g.dtype not in (torch.float16, torch.bfloat16) or b.dtype != g.dtype or low.dtype != g.dtype:
        return False
    return g.dim() == 2 and b.shape[1] <= MAX_RANK and g.stride(1) == 1 and g.shape[0] > 0 and g.shape[1] > 0


def _interpreting() -> bool:
    """Triton's CPU interpreter (``TRITON_INTERPRET=1``): the kernels run on CPU tensors, for tests."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _block_rank(rank: int) -> int:
    return max(16, 1 << (rank - 1).bit_length())


def _launch(
    g: torch.Tensor, b: torch.Tensor, low: torch.Tensor, scaling: float, b_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    kernel = _kernels()
    tokens, out = g.shape
    rank = b.shape[1]
    grad_low = torch.empty(tokens, rank, device=g.device, dtype=g.dtype)
    grad_b = torch.zeros(out, rank, device=g.device, dtype=torch.float32)
    grid = (triton_cdiv(tokens, LAUNCH["BLOCK_M"]),)
    kernel[grid](  # type: ignore[index]
        g,
        b,
        low,
        grad_low,
        grad_b,
        tokens,
        rank,
        g.stride(0),
        b.stride(0),
        b.stride(1),
        low.stride(0),
        low.stride(1),
        float(scaling),
        OUT=out,  # a constant of the kernel: the loop bound (one compilation per output width)
        BLOCK_R=_block_rank(rank),
        **LAUNCH,
    )
    return grad_low, grad_b if b_dtype == torch.float32 else grad_b.to(b_dtype)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _kernels() -> Any:
    """The jitted kernel, or ``None`` where Triton is not importable."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def output_grad_pair(
        g_ptr,
        b_ptr,
        low_ptr,
        grad_low_ptr,
        grad_b_ptr,
        tokens,
        rank,
        stride_g,
        stride_b0,
        stride_b1,
        stride_l0,
        stride_l1,
        scaling,
        OUT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        ranks = tl.arange(0, BLOCK_R)
        row_ok = rows < tokens
        rank_ok = ranks < rank
        low = tl.load(
            low_ptr + rows[:, None] * stride_l0 + ranks[None, :] * stride_l1,
            mask=row_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for start in range(0, OUT, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < OUT
            g = tl.load(
                g_ptr + rows[:, None] * stride_g + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0
            )
            b = tl.load(
                b_ptr + cols[:, None] * stride_b0 + ranks[None, :] * stride_b1,
                mask=col_ok[:, None] & rank_ok[None, :],
                other=0.0,
            )
            acc += tl.dot(g, b)
            part = tl.dot(tl.trans(g), low) * scaling
            tl.atomic_add(
                grad_b_ptr + cols[:, None] * rank + ranks[None, :], part, mask=col_ok[:, None] & rank_ok[None, :]
            )
        tl.store(
            grad_low_ptr + rows[:, None] * rank + ranks[None, :],
            (acc * scaling).to(grad_low_ptr.dtype.element_ty),
            mask=row_ok[:, None] & rank_ok[None, :],
        )

    return output_grad_pair
