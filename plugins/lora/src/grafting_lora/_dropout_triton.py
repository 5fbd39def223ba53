"""Triton kernels of :mod:`grafting_lora.dropout_kernels` (imported only where they run: this imports Triton).

The keep-mask is never stored: every kernel regenerates it from ``(seed, offset)`` with Philox.
Each Philox evaluation (four 32-bit words) gives eight 16-bit draws: element ``(i, j)`` takes half
``j % 2`` of word ``(j // 2) % 4`` of the block at counter ``(j // 8, i, offset_lo, offset_hi ^
STREAM)`` (:data:`STREAM` keeps the stream apart from torch's own, whose last two words are its
thread index). An element is kept when its draw is at least ``threshold`` (``p`` in units of
2⁻¹⁶). The mask of element ``(i, j)`` depends only on ``(seed, offset, threshold, i, j)``: not on
the input's shape nor on the tiles of the kernel that regenerates it; 32-bit arithmetic only.

Decorated at import: with ``TRITON_INTERPRET=1`` set before this module is first imported
(and while they run) they run on the CPU through Triton's interpreter (the tests do this), each
with its first tile configuration; on a GPU the two product kernels are autotuned per
(power-of-two bucket of the tokens ``M_BUCKET``, in, rank): a new length does not tune again.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

#: The third Philox counter word of every draw here ("LoRA").
STREAM = tl.constexpr(0x4C6F5241)
#: Row shares of the backward kernel are multiples of this (every tile height tried divides it).
ROW_QUANTUM = 64


def _configs(shapes: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """(rows, columns, warps, stages) tiles to try; the interpreter takes the first alone."""
    interpreted = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")  # any Triton 3.x
    chosen = shapes[:1] if interpreted else shapes
    return [triton.Config({"BM": bm, "BK": bk}, num_warps=w, num_stages=s) for bm, bk, w, s in chosen]


@triton.jit
def _keep(seed, offset, rows, k0, threshold, BM: tl.constexpr, BK: tl.constexpr):
    """The (BM, BK) keep-mask of ``rows`` × columns ``k0 .. k0+BK`` (``k0`` a multiple of 8)."""
    group = (k0 // 8 + tl.arange(0, BK // 8)).to(tl.uint32)
    c0 = group[None, :] + tl.zeros((BM, 1), dtype=tl.uint32)
    c1 = rows.to(tl.uint32)[:, None] + tl.zeros((1, BK // 8), dtype=tl.uint32)
    offset = offset.to(tl.int64)
    c2 = c0 * 0 + offset.to(tl.uint32)
    c3 = c0 * 0 + ((offset >> 32).to(tl.uint32) ^ STREAM)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    words = tl.join(tl.join(r0, r1), tl.join(r2, r3)).to(tl.int32, bitcast=True)  # (BM, BK/8, 2, 2)
    draws = tl.join(words & 0xFFFF, (words >> 16) & 0xFFFF)  # column 8g + 2w + h: half h of word w
    return tl.reshape(draws, (BM, BK)) >= threshold


@triton.jit(do_not_specialize=["seed", "offset"])
def keep_mask_kernel(out_ptr, M, K, seed, offset, threshold, BM: tl.constexpr, BK: tl.constexpr):
    """The keep-mask as int8 (M, K), for tests and checks."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    k0 = tl.program_id(1) * BK
    cols = k0 + tl.arange(0, BK)
    keep = _keep(seed, offset, rows, k0, threshold, BM, BK)
    inside = (rows[:, None] < M) & (cols[None, :] < K)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], keep.to(tl.int8), mask=inside)


@triton.autotune(
    _configs([(64, 64, 4, 3), (32, 64, 4, 3), (16, 128, 4, 4), (64, 128, 4, 3), (128, 64, 8, 3), (32, 128, 4, 4)]),
    key=["M_BUCKET", "K", "R"],
)
@triton.jit(do_not_specialize=["seed", "offset"])
def dropped_down_kernel(
    x_ptr,
    a_ptr,
    low_ptr,
    M,
    K,
    R,
    M_BUCKET,
    stride_x,
    stride_a,
    seed,
    offset,
    threshold,
    scale,
    BM: tl.constexpr,
    BK: tl.constexpr,
    RP: tl.constexpr,
):
    """``low = d(x)·Aᵀ`` (M, R) in x's dtype: x (M, K) read once, A (R, K) cast to x's dtype as loaded.

    ``d(x) = keep ⊙ x·scale`` rounded to x's dtype, as dropout writes it; the rank padded to RP.
    """
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    ranks = tl.arange(0, RP)
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        inside = (rows[:, None] < M) & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=inside, other=0.0)
        keep = _keep(seed, offset, rows, k0, threshold, BM, BK)
        h = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x.dtype)
        a_at = a_ptr + ranks[None, :] * stride_a + cols[:, None]
        a = tl.load(a_at, mask=(ranks[None, :] < R) & (cols[:, None] < K), other=0.0).to(x.dtype)  # (BK, RP)
        acc = tl.dot(h, a, acc)
    out = low_ptr + rows[:, None].to(tl.int64) * R + ranks[None, :]
    tl.store(out, acc.to(low_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (ranks[None, :] < R))


@triton.autotune(
    _configs([(64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2), (32, 128, 4, 2)]),
    key=["M_BUCKET", "K", "R", "WANT_X", "WANT_A"],
)
@triton.jit(do_not_specialize=["seed", "offset"])
def dropped_up_kernel(
    x_ptr,
    grad_low_ptr,
    a_ptr,
    grad_x_ptr,
    grad_a_ptr,
    M,
    K,
    R,
    M_BUCKET,
    stride_x,
    stride_a,
    rows_per_split,
    seed,
    offset,
    threshold,
    scale,
    WANT_X: tl.constexpr,
    WANT_A: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    RP: tl.constexpr,
):
    """Backward of :func:`dropped_down_kernel` over a K tile and a share of the rows (a multiple of BM).

    ``grad_x = keep ⊙ (grad_low·A)·scale`` (M, K) in x's dtype, written once (WANT_X);
    ``grad_a[split] = grad_lowᵀ·d(x)`` (R, K) float32 over this share's rows (WANT_A),
    summed over the splits by the caller. The mask is regenerated, ``x`` read again for A.
    """
    k0 = tl.program_id(0) * BK
    split = tl.program_id(1)
    cols = k0 + tl.arange(0, BK)
    ranks = tl.arange(0, RP)
    in_a = (ranks[:, None] < R) & (cols[None, :] < K)
    a = tl.load(a_ptr + ranks[:, None] * stride_a + cols[None, :], mask=in_a, other=0.0)
    a = a.to(grad_low_ptr.dtype.element_ty)  # (RP, BK)
    acc = tl.zeros((RP, BK), dtype=tl.float32)
    start = split * rows_per_split
    stop = tl.minimum(start + rows_per_split, M)
    for m0 in range(start, stop, BM):
        rows = m0 + tl.arange(0, BM)
        inside = (rows[:, None] < stop) & (cols[None, :] < K)
        keep = _keep(seed, offset, rows, k0, threshold, BM, BK)
        g_at = grad_low_ptr + rows[:, None].to(tl.int64) * R + ranks[None, :]
        g = tl.load(g_at, mask=(rows[:, None] < stop) & (ranks[None, :] < R), other=0.0)  # (BM, RP)
        if WANT_X:
            gx = tl.where(keep, tl.dot(g, a) * scale, 0.0)
            gx_at = grad_x_ptr + rows[:, None].to(tl.int64) * K + cols[None, :]
            tl.store(gx_at, gx.to(grad_x_ptr.dtype.element_ty), mask=inside)
        if WANT_A:
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=inside, other=0.0)
            h = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x.dtype)
            acc = tl.dot(tl.trans(g), h, acc)
    if WANT_A:
        out = grad_a_ptr + split.to(tl.int64) * R * K + ranks[:, None] * K + cols[None, :]
        tl.store(out, acc, mask=in_a)
