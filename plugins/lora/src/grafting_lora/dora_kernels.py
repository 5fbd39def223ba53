"""DoRA's small per-layer math and its one activation-sized backward pass as single kernels.

Two functions, each with a Triton kernel (CUDA tensors, or any tensors under
``TRITON_INTERPRET=1``) and the same arithmetic as torch ops (CPU, or without Triton):

* :func:`row_scales`: from ``W``, ``A``, ``B``, ``‖W‖²`` and ``m``, the inverse row norms
  ``1 / ‖W + scaling·B·A‖``, the scale ``s = m / ‖W + ΔW‖`` (float32, and rounded to the compute
  dtype for the activation-sized product) and ``scaling·B`` in the compute dtype (the low-rank
  product's factor), and ``A`` in that dtype: A's cast, the GEMMs ``W·Aᵀ`` and ``A·Aᵀ``, and one
  kernel for the rest, where the torch ops are eleven (casts of ``A`` and ``W·Aᵀ``, two products,
  ``addmm``, ``baddbmm``, clamp, ``rsqrt``, product, cast, scaled cast of ``B``). The GEMMs stay
  cuBLAS's: a first version of the kernel took ``W·Aᵀ`` in Triton, as float32 products on the CUDA
  cores, and ran 0.95 ms a layer on an H100 (107 ms of a 1.1B model's step).
* :func:`scaled_gradient`: the backward's ``g ⊙ s`` (and, with dropout, ``g ⊙ (s − 1)``) and the
  magnitude's gradient ``inv ⊙ Σ_tokens g ⊙ z``, reading ``g`` and ``z`` once: each program sums a
  chunk of tokens in float32, the chunks' partial sums are added by one ``sum`` (two stages, so
  the result does not depend on the order programs finish in, as atomics would).

:data:`USE_TRITON` turns the kernels on (``GRAFTING_TRITON_KERNELS=1``; off, the torch ops run everywhere); :data:`INTERPRETED`
runs them on CPU tensors in Triton's interpreter (tests).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch

from grafting_lora.scaled_products import mul_as, scaled_product

#: ``triton`` and ``triton.language``, imported on the kernels' first use (:func:`triton_runs`): importing
#: them costs a quarter of a second, which a process that never runs the kernels need not pay
triton: Any = None
tl: Any = None

#: Whether the Triton kernels run on CUDA tensors (else the torch ops, everywhere). Off unless the environment
#: sets ``GRAFTING_TRITON_KERNELS=1``: on an H100 a 1.1B DoRA step took less kernel time with them (130.8 ms
#: against 137.4) but waited 44 ms on the host, its rounds 1.80-2.05x the bound against 1.46x without, and per
#: layer call the two paths take the same time (README, benchmark section).
USE_TRITON = os.environ.get("GRAFTING_TRITON_KERNELS") == "1"
#: True: the kernels on CPU tensors too, in Triton's interpreter (for tests; ``TRITON_INTERPRET=1`` must be
#: set before ``triton`` is first imported, as the repository's conftest.py does).
INTERPRETED = False

#: Programs the backward pass aims for: token chunks enough to fill an H100's 132 SMs a few times over.
TARGET_PROGRAMS = 1024
BLOCK_TOKENS = 32
BLOCK_COLUMNS = 128
BLOCK_ROWS = 64  # rows per program of the row scales (each row reads rank-sized vectors only)


def triton_runs(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels run on ``tensors``: Triton present, CUDA tensors or :data:`INTERPRETED`,
    and eager mode (under ``torch.compile`` the torch ops, which the compiler fuses itself)."""
    if not USE_TRITON or torch.compiler.is_compiling() or not (INTERPRETED or all(t.is_cuda for t in tensors)):
        return False
    return _import_triton()


@functools.cache
def _import_triton() -> bool:
    """Whether Triton imports; once it has, :data:`triton` and :data:`tl` are its modules (the kernels' globals)."""
    global triton, tl
    try:
        import triton as triton_module
        import triton.language as language
    except ImportError:  # Triton is optional: the torch ops run without it
        return False
    triton, tl = triton_module, language
    return True


def _row_scales_source(  # type: ignore[no-untyped-def]
    p_ptr,
    gram_ptr,
    b_ptr,
    sq_ptr,
    m_ptr,
    inv_ptr,
    scale_ptr,
    half_ptr,
    up_ptr,
    rows,
    rank,
    scaling,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_RANK: tl.constexpr,
):
    """For a block of rows, from ``P = W·Aᵀ`` and ``G = A·Aᵀ`` (float32): ``inv = rsqrt(max(‖W‖² +
    scaling·⟨B, 2P + scaling·B·G⟩, 0))``, ``s = m·inv``, and ``s``, ``scaling·B`` in W's dtype."""
    o = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    k = tl.arange(0, BLOCK_RANK)
    row_ok = o < rows
    rank_ok = k < rank
    ok = row_ok[:, None] & rank_ok[None, :]
    low = half_ptr.dtype.element_ty
    p = tl.load(p_ptr + o[:, None] * rank + k[None, :], mask=ok, other=0.0)
    b = tl.load(b_ptr + o[:, None] * rank + k[None, :], mask=ok, other=0.0)
    gram = tl.load(gram_ptr + k[:, None] * rank + k[None, :], mask=rank_ok[:, None] & rank_ok[None, :], other=0.0)
    inner = 2.0 * p + scaling * tl.dot(b, gram, input_precision="ieee")
    sq = tl.load(sq_ptr + o, mask=row_ok, other=1.0) + scaling * tl.sum(b * inner, axis=1)
    inv = 1.0 / tl.sqrt_rn(tl.maximum(sq, 0.0))
    scale = tl.load(m_ptr + o, mask=row_ok, other=0.0) * inv
    tl.store(inv_ptr + o, inv, mask=row_ok)
    tl.store(scale_ptr + o, scale, mask=row_ok)
    tl.store(half_ptr + o, scale.to(low, fp_downcast_rounding="rtne"), mask=row_ok)
    tl.store(up_ptr + o[:, None] * rank + k[None, :], (scaling * b).to(low, fp_downcast_rounding="rtne"), mask=ok)


def _scaled_gradient_source(  # type: ignore[no-untyped-def]
    g_ptr,
    z_ptr,
    scale_ptr,
    inv_ptr,
    gz_ptr,
    gh_ptr,
    part_ptr,
    tokens,
    cols,
    stride_gt,
    stride_gc,
    stride_zt,
    chunk,
    WRITE_GZ: tl.constexpr,
    WRITE_GH: tl.constexpr,
    REDUCE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One chunk of tokens × a block of columns: ``g·s``, ``g·(s − 1)`` written, ``inv·Σ g·z`` partial."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < cols
    dtype = g_ptr.dtype.element_ty
    s = tl.load(scale_ptr + c, mask=c_ok, other=0.0)
    s_half = s.to(dtype, fp_downcast_rounding="rtne").to(tl.float32)  # the scale rounded as the torch ops round it
    s_less = (s - 1.0).to(dtype, fp_downcast_rounding="rtne").to(tl.float32)
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    start = tl.program_id(0) * chunk
    for t0 in range(0, chunk, BLOCK_T):
        t = start + t0 + tl.arange(0, BLOCK_T)
        ok = (t[:, None] < tokens) & c_ok[None, :]
        g = tl.load(g_ptr + t[:, None] * stride_gt + c[None, :] * stride_gc, mask=ok, other=0.0).to(tl.float32)
        if WRITE_GZ:
            tl.store(
                gz_ptr + t[:, None] * cols + c[None, :], (g * s_half).to(dtype, fp_downcast_rounding="rtne"), mask=ok
            )
        if WRITE_GH:
            tl.store(
                gh_ptr + t[:, None] * cols + c[None, :], (g * s_less).to(dtype, fp_downcast_rounding="rtne"), mask=ok
            )
        if REDUCE:
            z = tl.load(z_ptr + t[:, None] * stride_zt + c[None, :], mask=ok, other=0.0).to(tl.float32)
            acc += g * z
    if REDUCE:
        inv = tl.load(inv_ptr + c, mask=c_ok, other=0.0)
        tl.store(part_ptr + tl.program_id(0) * cols + c, tl.sum(acc, axis=0) * inv, mask=c_ok)


@functools.cache
def _jitted(source: Callable[..., Any], interpreted: bool) -> Any:
    """``source`` as a Triton kernel, built once per mode (``triton.jit`` reads ``TRITON_INTERPRET`` when it runs)."""
    return triton.jit(source)


def _kernel(source: Callable[..., Any]) -> Any:
    return _jitted(source, os.environ.get("TRITON_INTERPRET") == "1")


def row_scales(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    weight_sq: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    cast_a: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(inv, s, s_half, up, a_half)``: ``1 / ‖W + scaling·B·A‖``, ``m·inv`` (float32), and in W's dtype
    ``s``, ``scaling·B`` and ``A`` (``cast_a`` if given).

    ``‖W + scaling·B·A‖² = ‖W‖² + scaling·⟨B, 2·W·Aᵀ + scaling·B·(A·Aᵀ)⟩`` row by row, clamped at 0
    (:func:`~grafting_lora.dora_node.dora_norm_squared`). With the kernel, ``W·Aᵀ`` and ``A·Aᵀ`` are
    GEMMs and ``W·Aᵀ`` stays float32 where the device writes float32 products of half precision (CUDA;
    the torch ops round it to W's dtype first: their norms are the less exact by that rounding); the
    kernel does the rest, rank-sized work per row.
    """
    dtype = weight.dtype
    a, b = lora_a.float(), lora_b.float()
    m = magnitude.reshape(-1)
    wide = (lora_a.dtype, lora_b.dtype, m.dtype, weight_sq.dtype) == (torch.float32,) * 4
    plain = weight.dim() == 2 and weight.stride(1) == 1 and dtype in (torch.bfloat16, torch.float16)
    if wide and plain and triton_runs(weight, a, b, m):
        rows, rank = weight.shape[0], a.shape[0]
        a_half = lora_a.to(dtype) if cast_a is None else cast_a
        products = scaled_product(weight, a_half.t(), torch.float32)  # W·Aᵀ: float32 from the GEMM on CUDA
        gram = a @ a.t()
        inv = torch.empty(rows, dtype=torch.float32, device=weight.device)
        scale = torch.empty_like(inv)
        half = torch.empty(rows, dtype=dtype, device=weight.device)
        up = torch.empty((rows, rank), dtype=dtype, device=weight.device)
        _kernel(_row_scales_source)[(triton.cdiv(rows, BLOCK_ROWS),)](
            products,
            gram,
            b.contiguous(),
            weight_sq.contiguous(),
            m.contiguous(),
            inv,
            scale,
            half,
            up,
            rows,
            rank,
            float(scaling),
            BLOCK_ROWS=BLOCK_ROWS,
            BLOCK_RANK=max(16, triton.next_power_of_2(rank)),
        )
        return inv, scale, half, up, a_half
    a_half = lora_a.to(dtype) if cast_a is None else cast_a
    inv = norm_squared(weight @ a_half.t(), a @ a.t(), b, weight_sq, scaling).rsqrt_()
    scale = m * inv
    up = mul_as(b, scaling, dtype)  # the product and the cast: one kernel
    return inv, scale, scale.to(dtype), up, a_half


def norm_squared(
    prod: torch.Tensor, gram: torch.Tensor, b: torch.Tensor, weight_sq: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``max(‖W‖² + scaling·⟨B, 2P + scaling·B·G⟩, 0)`` row by row as torch ops (float32 ``B`` and ``G``)."""
    inner = torch.addmm(prod.float(), b, gram, beta=2.0, alpha=scaling)
    # ‖W‖² + s·⟨B_o, inner_o⟩ for every row o, as a batch of (1, r)·(r, 1) products
    rows = torch.baddbmm(weight_sq.view(-1, 1, 1), b.unsqueeze(1), inner.unsqueeze(2), alpha=scaling)
    return rows.view(-1).clamp_min_(0)


def scaled_gradient(
    g: torch.Tensor,
    z: torch.Tensor,
    scale: torch.Tensor,
    scale_half: torch.Tensor,
    inv: torch.Tensor,
    write_gz: bool,
    write_gh: bool,
    reduce: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(g ⊙ s, g ⊙ (s − 1), inv ⊙ Σ_tokens g ⊙ z)``, each only if asked for, ``g`` and ``z`` (tokens, out).

    ``s`` is rounded to ``g``'s dtype before each product (``scale_half``), as one product in
    that dtype rounds it; ``s − 1`` in float32 first (``g ⊙ s − g`` would cancel: ``s`` is near
    1). The sum is float32 (the kernel's products too; the torch ops round each ``g ⊙ z`` to
    ``g``'s dtype first).
    """
    if not (write_gz or write_gh or reduce):
        return None, None, None
    if triton_runs(g, z, scale) and scale.dtype == inv.dtype == torch.float32 and z.stride(1) == 1:
        return _scaled_gradient_kernel(g, z, scale, inv, write_gz, write_gh, reduce)
    gz = g * scale_half if write_gz else None
    gh = g * (scale - 1.0).to(g.dtype) if write_gh else None
    grad = torch.sum(g * z, 0, dtype=torch.float32).mul_(inv) if reduce else None
    return gz, gh, grad


def _scaled_gradient_kernel(
    g: torch.Tensor,
    z: torch.Tensor,
    scale: torch.Tensor,
    inv: torch.Tensor,
    write_gz: bool,
    write_gh: bool,
    reduce: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """:func:`scaled_gradient` as one Triton kernel and, when there are several token chunks, one ``sum``."""
    tokens, cols = g.shape
    col_blocks = triton.cdiv(cols, BLOCK_COLUMNS)
    chunks = max(1, min(triton.cdiv(tokens, BLOCK_TOKENS), TARGET_PROGRAMS // col_blocks))
    chunk = triton.cdiv(triton.cdiv(tokens, chunks), BLOCK_TOKENS) * BLOCK_TOKENS
    chunks = triton.cdiv(tokens, chunk)
    gz = torch.empty((tokens, cols), dtype=g.dtype, device=g.device) if write_gz else None
    gh = torch.empty((tokens, cols), dtype=g.dtype, device=g.device) if write_gh else None
    part = torch.empty((chunks, cols), dtype=torch.float32, device=g.device) if reduce else None
    dummy = g  # an unused pointer argument: never read or written (its branch is compiled out)
    _kernel(_scaled_gradient_source)[(chunks, col_blocks)](
        g,
        z,
        scale.contiguous(),
        inv.contiguous(),
        dummy if gz is None else gz,
        dummy if gh is None else gh,
        dummy if part is None else part,
        tokens,
        cols,
        g.stride(0),
        g.stride(1),
        z.stride(0),
        chunk,
        WRITE_GZ=write_gz,
        WRITE_GH=write_gh,
        REDUCE=reduce,
        BLOCK_T=BLOCK_TOKENS,
        BLOCK_C=BLOCK_COLUMNS,
    )
    grad = None if part is None else (part.view(-1) if chunks == 1 else part.sum(0))
    return gz, gh, grad
