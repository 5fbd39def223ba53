"""LoRA's computation, written once: the reference every fast path is checked against.

A base layer with weight ``W`` (out, in) — a convolution's seen as (out, in·k), an embedding's
as (dim, num) — gets trained factors ``A`` (r, in) and ``B`` (out, r) and a fixed ``scaling``:

* the delta on the base output:  ``Δy = B(A(dropout(x))) · scaling``          (:func:`lora_delta`)
* the merged weight:             ``W + ΔW`` with ``ΔW = B·A · scaling``       (:func:`delta_weight`)

DoRA adds a trained magnitude ``m`` (one entry per output row) and rescales each row of the
adapted weight to it, the row norm a constant for autograd (no gradient flows through it):

* the scale:   ``s = m / ‖W + ΔW‖`` per output row                          (:func:`dora_norm`)
* the delta:   ``Δy = (s − 1) ⊙ W·h + s ⊙ B(A(h)) · scaling``, ``h = dropout(x)`` (:func:`dora_delta`)
* the merge:   ``W ← s ⊙ (W + ΔW)``, unmerged by ``W ← W / s − ΔW``       (:func:`dora_merge`,
  :func:`dora_unmerge`)

Fast paths — the same functions up to rounding, taken only in half precision (float32 and
float64 compute the reference, in PEFT's order of operations) and each tested against the
reference for values and gradients (``tests/test_lora_fast_path.py``, ``tests/test_lora_reference.py``):

* :func:`low_rank_add` — ``y + lora_delta`` with the scaling folded into ``B`` and the last
  product added to ``y`` (``LoraLinear.add_delta``), its first product
  possibly computed with the sibling layers' in one matmul (shared-input grouping,
  ``LoraLinear.input_factor``);
* :mod:`grafting_lora.routed` — ``y + lora_delta`` of each sample's own adapter in a routed
  batch: every adapter's ranks side by side, each sample masked to its own adapter's columns, one
  autograd node (with the base layer inside where it is a plain linear layer;
  ``LoraLinear.add_grouped``/``grouped_call``); past ``routed.MAX_COLUMNS`` ranks,
  :func:`grouped_low_rank_add` — one gathered product of each sample's own (padded) factors;
* :mod:`grafting_lora.fused` and :mod:`grafting_lora.dora_node` — the base layer and its delta as
  one autograd node (and as plain ops without autograd): :class:`~grafting_lora.fused.LoraLinearFunction`
  for ``base(x) + lora_delta``, :class:`~grafting_lora.dora_node.DoraLinearFunction` for DoRA's layer, with
  :func:`~grafting_lora.dora_node.dora_norm_squared` the fast path of :func:`dora_norm` (squared)
  (``LoraLinear.fused_call``).

``LoraLinear.fused = False`` (on the class, or on one adapter) turns every fast path off: the
layer then computes the functions of this module and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

#: Applies one factor: ``product(h, weight, bias)`` — ``F.linear``, or a convolution for conv layers.
Product = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


# -- the reference -----------------------------------------------------------------------------------
def low_rank(
    h: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    down: Product = F.linear,
    up: Product = F.linear,
) -> torch.Tensor:
    """``B(A(h)) + bias``, unscaled; ``down``/``up`` apply ``A`` and ``B`` (linear by default)."""
    return up(down(h, a, None), b, bias)


def lora_delta(
    h: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    *,
    down: Product = F.linear,
    up: Product = F.linear,
) -> torch.Tensor:
    """LoRA's delta ``(B(A(h)) + bias) · scaling`` for ``h = dropout(x)``, in ``h``'s dtype."""
    return low_rank(h, a, b, bias, down=down, up=up) * scaling


def delta_weight(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``ΔW = B·A · scaling`` as an (out, in·k) matrix, for factors of any kernel shape."""
    return (b.flatten(1) @ a.flatten(1)) * scaling


def dora_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``‖W + ΔW‖`` per output row, in ``weight``'s dtype (``delta`` is cast to it)."""
    return torch.linalg.vector_norm(weight + delta.to(weight), dim=1)


def dora_scale(magnitude: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``s = m / ‖W + ΔW‖`` per output row, the norm computed without a graph (DoRA's constant)."""
    with torch.no_grad():
        norm = dora_norm(weight, delta)
    return magnitude.flatten() / norm


def dora_delta(
    base_out: torch.Tensor, lora_out: torch.Tensor, scale: torch.Tensor, scaling: float = 1.0
) -> torch.Tensor:
    """DoRA's delta ``(s − 1) ⊙ W·h + s ⊙ lora_out · scaling`` in PEFT's order of operations.

    ``base_out`` is ``W·h`` without the base bias, ``scale`` is shaped to broadcast over its
    output dimension; ``lora_out`` is ``B(A(h))``, unscaled (or scaled, with ``scaling`` 1).
    """
    scaled = scale * lora_out
    return (scale - 1) * base_out + (scaled * scaling if scaling != 1.0 else scaled)


def dora_merge(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s ⊙ (W + ΔW), s)``: DoRA's merged weight and the scale it applied, in ``weight``'s dtype."""
    merged = weight + delta.to(weight)
    scale = magnitude.flatten().to(weight) / torch.linalg.vector_norm(merged, dim=1)
    return scale[:, None] * merged, scale


def dora_unmerge(weight: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``W / s − ΔW``: the weight before :func:`dora_merge` applied ``scale``."""
    return weight / scale[:, None] - delta.to(weight)


# -- fast paths --------------------------------------------------------------------------------------
def low_rank_add(
    y: torch.Tensor,
    h: torch.Tensor | None,
    a: torch.Tensor | None,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    low: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fast path of ``y + lora_delta(h)``: ``y + (h·aᵀ)·bᵀ (+ bias)``, the last product added to ``y``.

    ``a`` (r, in) and ``b`` (out, r) already carry the scaling and the compute dtype;
    ``y`` is left untouched (autograd may hold it, and ``LayerCall.base_out`` is it).
    ``low`` is ``h·aᵀ`` when already computed (shared-input grouping); ``h`` and ``a`` are then not read.

    The product and the add are two ops, not one ``addmm``: an out-of-place ``addmm`` with a matrix
    bias copies ``y`` into its output before the GEMM accumulates onto it (in eager the same passes
    over the (tokens, out) output as the add). Under ``torch.compile`` Inductor then adds the
    product inside the kernel that reads the sum (RoPE, the residual add, SiLU·up) and makes the
    ``addmm`` itself only where the sum must be written out; an ``addmm`` written here would stay
    one (Inductor keeps half-precision ``addmm``), with its copy. The delta is rounded to ``y``'s
    dtype before the add, as the reference rounds it.
    """
    if low is None:
        if h is None or a is None:
            raise ValueError("the low-rank product needs the input and A, or the product itself")
        low = F.linear(h, a)
    if bias is not None:
        y = y + bias
    return y + low @ b.t()


def grouped_low_rank_add(
    y: torch.Tensor, x: torch.Tensor, slot: torch.Tensor, stack_a: torch.Tensor, stack_b: torch.Tensor
) -> torch.Tensor:
    """Fast path of ``y + lora_delta`` for each sample's own adapter: one gathered product for all.

    ``stack_a`` (n, r, in) and ``stack_b`` (n, out, r) hold every adapter's A and scaled B in
    ``y``'s dtype (ranks zero-padded to the largest; an all-zero slot for samples without an
    adapter); sample ``i`` uses slot ``slot[i]``. Two batched products run over the whole batch,
    as multi-LoRA servers batch them.
    """
    seq = x.reshape(x.shape[0], -1, x.shape[-1]).to(y.dtype)  # (batch, positions, in)
    low = torch.bmm(seq, stack_a[slot].transpose(1, 2))
    out = torch.baddbmm(y.reshape(y.shape[0], -1, y.shape[-1]), low, stack_b[slot].transpose(1, 2))
    return out.view(y.shape)
