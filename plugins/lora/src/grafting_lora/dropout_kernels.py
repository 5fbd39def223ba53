"""LoRA with dropout on the adapter's input, its mask never stored: one node, two Triton kernels.

``y = x·Wᵀ + b + s·(d(x)·Aᵀ)·Bᵀ`` with ``d`` dropout of probability ``p``. The torch node
(:class:`~grafting_lora.fused.LoraLinearFunction`, the reference and the fallback) draws
``native_dropout(x)``: it writes the dropped input and a bool mask, each (tokens, in), keeps both
for backward and masks the adapter's input gradient in a further pass. Here
(:class:`LoraDropoutFunction`):

* forward: ``low = d(x)·Aᵀ`` (tokens, r) by one kernel that reads ``x`` once and draws the mask
  in registers from a Philox ``(seed, offset)`` (eight 16-bit draws per evaluation: ``p`` is
  rounded to a multiple of 2⁻¹⁶, :func:`keep_rule`); nothing of size (tokens, in) is written;
* backward: one kernel regenerates the same mask, writes the adapter's input gradient
  ``keep ⊙ (grad_low·A)·scale`` once (the base's ``addmm_`` then accumulates onto it) and
  reduces ``A``'s gradient ``grad_lowᵀ·d(x)`` from ``x`` (the node's input, kept by reference,
  as the torch node keeps it for ``W``'s gradient).

``(seed, offset)`` come from the device's default generator (its seed, and its Philox offset,
advanced one step per call: :func:`draw_seed`), so ``torch.manual_seed`` makes a run
reproducible and every call draws a fresh mask. The mask is not the one ``nn.Dropout`` would draw for the same seed
(:func:`keep_mask` materialises it, for checks). Taken on CUDA with Triton installed, outside
``torch.compile`` and CUDA-graph capture (:func:`serves`); the kernels also run on the CPU
through Triton's interpreter (``TRITON_INTERPRET=1`` before the first use, as the tests do).
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache
from types import ModuleType
from typing import Any

import torch

from grafting_lora.fused import lora_products
from grafting_lora.scaled_products import mul_as, scaled_product

#: Whether the Triton kernels run on CUDA tensors (else the torch node, everywhere). Off unless the environment
#: sets ``GRAFTING_TRITON_KERNELS=1``: on an H100 they took a 1.1B step from 1.25x the bound to 1.18x and its
#: peak from 16.8 to 12.6 GiB, but timed alone per layer call they were slower than the torch node (0.76-0.83x),
#: and their tiny-Llama float16 case has not yet run on a GPU (README, benchmark section).
USE_TRITON = os.environ.get("GRAFTING_TRITON_KERNELS") == "1"
#: Rows × columns of :func:`keep_mask`'s tiles (the mask does not depend on them).
BLOCK_ROWS, BLOCK_COLS = 128, 128
#: The backward kernel's grid aims at this many programs (64-column tiles × row shares) to fill a GPU.
BACKWARD_PROGRAMS = 512
#: Above this rank the (rank, tile) accumulators no longer fit in registers: the torch node serves.
MAX_RANK = 128
_SEED_BITS = (1 << 63) - 1


@cache
def has_triton() -> bool:
    """Whether Triton can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def serves(x: torch.Tensor, lora_a: torch.Tensor) -> bool:
    """Whether :class:`LoraDropoutFunction` takes ``x``: on CUDA with Triton, not compiling or capturing a graph.

    ``lora_a`` (r, in): ranks up to :data:`MAX_RANK`; an empty input stays with the torch node.
    """
    return (
        USE_TRITON
        and x.is_cuda
        and x.numel() > 0
        and lora_a.shape[0] <= MAX_RANK
        and has_triton()
        and not torch.compiler.is_compiling()
        and not torch.cuda.is_current_stream_capturing()
    )


def _kernels() -> ModuleType:
    from grafting_lora import _dropout_triton  # imports Triton: only where a kernel runs

    return _dropout_triton


def keep_rule(p: float) -> tuple[int, float]:
    """``(threshold, scale)``: an element is kept when its 16-bit draw is ``≥ threshold`` (``p`` rounded to
    a multiple of 2⁻¹⁶, below 1) and then scaled by ``1 / (1 - threshold·2⁻¹⁶)``, so ``E[d(x)] = x`` exactly.
    """
    threshold = min(round(p * 65536), 65535)
    return threshold, 65536 / (65536 - threshold)


def draw_seed(device: torch.device) -> tuple[int, int]:
    """``(seed, offset)`` for one call's mask, from ``device``'s default generator.

    On CUDA: the generator's seed and Philox offset, the offset then advanced by one step (4):
    a call's mask is a function of (row, column) in the stream the offset names (no kernel, no
    synchronisation). Elsewhere (the interpreter): a seed drawn from torch's generator.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        gen = torch.cuda.default_generators[index]
        offset = gen.get_offset()
        gen.set_offset(offset + 4)  # the generator's offsets step by 4
        return gen.initial_seed() & _SEED_BITS, offset
    return int(torch.randint(0, 1 << 62, (1,)).item()), 0


def keep_mask(rows: int, cols: int, p: float, seed: int, offset: int, device: torch.device | str) -> torch.Tensor:
    """The bool (rows, cols) keep-mask the kernels draw for ``(seed, offset)``: for tests and checks."""
    out = torch.empty(rows, cols, dtype=torch.int8, device=device)
    grid = (-(-rows // BLOCK_ROWS), -(-cols // BLOCK_COLS))
    threshold = keep_rule(p)[0]
    _kernels().keep_mask_kernel[grid](out, rows, cols, seed, offset, threshold, BM=BLOCK_ROWS, BK=BLOCK_COLS)
    return out.bool()


def _bucket(m: int) -> int:
    """The power of two at or above ``m``: the token count the kernels' tiles are tuned for."""
    return 1 << max(0, m - 1).bit_length()


def _padded_rank(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())


def dropped_down(flat: torch.Tensor, a: torch.Tensor, p: float, seed: int, offset: int) -> torch.Tensor:
    """``d(flat)·Aᵀ`` (tokens, r) in ``flat``'s dtype, the mask drawn from ``(seed, offset)``."""
    m, k = flat.shape
    r = a.shape[0]
    low = flat.new_empty(m, r)
    _kernels().dropped_down_kernel[lambda meta: (-(-m // meta["BM"]),)](
        flat, a, low, m, k, r, _bucket(m), flat.stride(0), a.stride(0), seed, offset, *keep_rule(p), RP=_padded_rank(r)
    )
    return low


def dropped_up(
    flat: torch.Tensor,
    grad_low: torch.Tensor,
    a: torch.Tensor,
    p: float,
    seed: int,
    offset: int,
    want_x: bool = True,
    want_a: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Backward of :func:`dropped_down`: ``(keep ⊙ (grad_low·A)·scale, grad_lowᵀ·d(flat))`` (:func:`keep_rule`).

    The first (tokens, in) in ``flat``'s dtype, the second (r, in) in ``a``'s dtype (reduced in
    float32 over :data:`BACKWARD_PROGRAMS`-ish row shares, then summed); either ``None`` when not wanted.
    """
    kernels = _kernels()
    m, k = flat.shape
    r = a.shape[0]
    quantum = kernels.ROW_QUANTUM
    blocks = -(-m // quantum)
    splits = max(1, min(blocks, -(-BACKWARD_PROGRAMS // -(-k // 64)))) if want_a else blocks
    rows_per_split = -(-blocks // splits) * quantum
    splits = -(-m // rows_per_split)
    grad_x = flat.new_empty(m, k) if want_x else None
    partial = torch.empty(splits, r, k, dtype=torch.float32, device=flat.device) if want_a else None
    kernels.dropped_up_kernel[lambda meta: (-(-k // meta["BK"]), splits)](
        flat, grad_low.contiguous(), a, grad_x, partial, m, k, r, _bucket(m), flat.stride(0), a.stride(0), rows_per_split,
        seed, offset, *keep_rule(p), WANT_X=want_x, WANT_A=want_a, RP=_padded_rank(r),
    )  # fmt: skip
    if partial is None:
        return grad_x, None
    grad_a = partial[0] if splits == 1 else partial.sum(0)
    return grad_x, grad_a.to(a.dtype)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as (tokens, in) with unit stride along ``in`` (a view where it can be)."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


class LoraDropoutFunction(torch.autograd.Function):
    """``x·Wᵀ + b + scaling·(d(x)·Aᵀ)·Bᵀ`` as one node, ``d`` dropout of probability ``p`` (0 < p < 1).

    ``x`` (..., in) in half precision, ``W`` (out, in) in x's dtype, ``A`` (r, in), ``B`` (out, r)
    in any float dtype (A cast to x's inside the kernels, ``scaling·B`` formed in x's dtype by one
    kernel; their gradients come back in their dtypes). Saves ``x``, ``W``, ``A``, ``scaling·B``,
    ``low`` (tokens, r) and the seed: no (tokens, in) tensor of its own. Per call 4 kernels forward
    (2 of them the products every LoRA layer has) and 6 backward, ``W``'s own gradient aside.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        p: float,
    ) -> torch.Tensor:
        flat = _rows(x)
        a = lora_a if lora_a.stride(-1) == 1 else lora_a.contiguous()
        seed, offset = draw_seed(x.device)
        up = mul_as(lora_b, scaling, x.dtype)  # (out, r): the scaling on the small matrix
        low = dropped_down(flat, a, p, seed, offset)
        y, low = lora_products(flat, None, weight, bias, None, up, 1.0, low)
        ctx.save_for_backward(flat, weight, a, up, low)
        ctx.draw = (p, seed, offset)
        ctx.scaling = scaling
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        ctx.b_dtype = lora_b.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat, weight, a, up, low = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if need_x or need_a:
            grad_low = g @ up  # (tokens, r): small, the scaling included
            adapter_x, grad_a = dropped_up(flat, grad_low, a, *ctx.draw, want_x=need_x, want_a=need_a)
            if adapter_x is not None:  # the base's input gradient accumulated onto the adapter's
                grad_x = adapter_x.addmm_(g, weight).view(ctx.x_shape)
        if need_w:
            grad_w = g.t() @ flat
        if need_bias and ctx.has_bias:
            grad_bias = g.sum(0)
        if need_b:
            grad_b = scaled_product(g.t(), low, ctx.b_dtype, ctx.scaling)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None
