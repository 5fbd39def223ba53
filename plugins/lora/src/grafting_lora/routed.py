"""Fast path of LoRA adapters routed per sample on one layer: all adapters' ranks side by side, one node.

Sample ``i`` of a batch goes through adapter ``k = index[i]`` (or none, ``index[i] = -1``):
``y_i + s_k · (x_i·A_kᵀ)·B_kᵀ``. With ``A = [A_1; …; A_n]`` (R, in) and ``B = [B_1 … B_n]``
(out, R) the ranks of every adapter laid side by side (``R = Σ r_k``), that is

    ``y + ((x·Aᵀ) ⊙ M)·Bᵀ``,  ``M[i, c] = s_k`` if column ``c`` is one of adapter ``k``'s and
    sample ``i`` is routed to ``k``, else 0                                     (:func:`column_mask`)

— two skinny products over the whole batch, as one adapter's, with ``R`` columns instead of ``r``.
The products read each activation once whatever ``R`` is; up to a few hundred columns they are
bound by that read, not by their arithmetic (:data:`MAX_COLUMNS`), so the extra columns cost
little. Nothing is gathered, scattered or padded: unequal ranks, samples on no adapter and
adapters in any order of the batch are all the mask. Gradients: a column's input gradient is
masked the same way, so each adapter's ``A`` and ``B`` get gradients from its own samples only,
exactly zero from the others' (while every adapter's product stays finite: an adapter whose product
overflows on a sample not routed to it would give that sample ``inf · 0``, NaN).

The masks depend only on the routing and the adapters' ranks and scalings: each is built once
per batch (on the device, from the routing's index) and shared by every layer that asks for it.

:class:`RoutedLoraFunction` is the whole delta on the base output as one autograd node (backward:
four skinny products and the mask); :class:`RoutedLoraLinearFunction` has a plain linear base layer
inside too, as ``fused.LoraLinearFunction`` has for one adapter: the low-rank product accumulated
into the base output and the adapters' input gradient into the base's in place, so no
activation-sized pass is left besides the products. :func:`routed_lora` and
:func:`routed_lora_linear` are their forwards as plain ops, for inference. All are checked against
the reference (each adapter on its own rows, ``reference.lora_delta``) for values and gradients in
``tests/test_lora_routed.py``.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Sequence
from typing import Any

import torch

#: Most columns (sum of the routed adapters' ranks) taken side by side: up to here the two products
#: are bound by reading the activation (a bf16 product with N columns does N FLOPs per byte read;
#: an H100 does ~295 per byte of memory bandwidth); past it they would pay for the zeros of the mask.
MAX_COLUMNS = 256

#: per-layer reads without a Python frame each (the routed path runs once per adapted layer and batch)
_wants_grad = operator.attrgetter("requires_grad")
_dtype_of = operator.attrgetter("dtype")

_Key = tuple[tuple[int, ...], tuple[float, ...], torch.dtype, torch.device]
#: per (ranks, scalings, dtype, device): which adapter owns each column, and its scaling
_columns: dict[_Key, tuple[torch.Tensor, torch.Tensor]] = {}
#: per (ranks, scalings, dtype, device): the last routing index seen and its mask
_masks: dict[_Key, tuple[weakref.ref[torch.Tensor], torch.Tensor]] = {}


def mask_dtype(dtype: torch.dtype) -> torch.dtype:
    """The mask's dtype for products in ``dtype``: float32 at least (a scaling exact as a float)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def column_mask(
    index: torch.Tensor, ranks: Sequence[int], scalings: Sequence[float], dtype: torch.dtype
) -> torch.Tensor:
    """``M`` (batch, 1, R) in ``mask_dtype(dtype)``: sample ``i``'s scaling on its adapter's columns, 0 elsewhere.

    ``index[i]`` is the position of sample ``i``'s adapter in ``ranks``/``scalings`` or -1 (none).
    Built once per routing index (a batch) for each ranks and scalings, outside ``torch.compile``.
    """
    key = (tuple(ranks), tuple(map(float, scalings)), mask_dtype(dtype), index.device)
    compiling = torch.compiler.is_compiling()
    if not compiling:
        hit = _masks.get(key)
        if hit is not None and hit[0]() is index:
            return hit[1]
    owner, scale = _columns.get(key) or _column_constants(key, compiling)
    mask = torch.where(index[:, None, None] == owner, scale, 0.0)
    if not compiling:
        _masks[key] = (weakref.ref(index), mask)
    return mask


def _column_constants(key: _Key, compiling: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ranks, scalings, dtype, device = key
    owner = torch.tensor([k for k, r in enumerate(ranks) for _ in range(r)], dtype=torch.long, device=device)
    scale = torch.tensor(
        [s for s, r in zip(scalings, ranks, strict=True) for _ in range(r)], dtype=dtype, device=device
    )
    if not compiling:
        _columns[key] = (owner, scale)
    return owner, scale


def side_by_side(
    lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` (R, in) and ``B`` (out, R) in ``dtype``: the adapters' factors concatenated, cast as they are copied."""
    a = torch.empty(sum([w.shape[0] for w in lora_a]), lora_a[0].shape[1], dtype=dtype, device=lora_a[0].device)
    b = torch.empty(lora_b[0].shape[0], a.shape[0], dtype=dtype, device=a.device)
    return torch.cat(list(lora_a), out=a), torch.cat(list(lora_b), dim=1, out=b)


def _low(x: torch.Tensor, a: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(flat x, (x·Aᵀ) ⊙ M)`` with ``x`` flattened to (tokens, in)."""
    flat = x.reshape(-1, x.shape[-1])
    low = flat @ a.t()
    low.view(mask.shape[0], -1, low.shape[-1]).mul_(mask)
    return flat, low


def routed_lora(y: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``y + ((x·Aᵀ) ⊙ M)·Bᵀ`` as plain ops (the forward of :class:`RoutedLoraFunction`), for inference."""
    _, low = _low(x, a, mask)
    return torch.addmm(y.reshape(-1, y.shape[-1]), low, b.t()).view(y.shape)


def routed_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
) -> torch.Tensor:
    """``x·Wᵀ + bias + ((x·Aᵀ) ⊙ M)·Bᵀ`` as plain ops (the forward of :class:`RoutedLoraLinearFunction`)."""
    flat, low = _low(x, a, mask)
    y = flat @ weight.t() if bias is None else torch.addmm(bias, flat, weight.t())
    return y.addmm_(low, b.t()).view(*x.shape[:-1], y.shape[-1])


def _save(ctx: Any, factors: tuple[torch.Tensor, ...], x: torch.Tensor, *saved: torch.Tensor | None) -> None:
    n = len(factors) // 2
    ctx.save_for_backward(*saved)
    ctx.x_shape = x.shape
    ctx.ranks = [w.shape[0] for w in factors[:n]]
    ctx.dtypes = (list(map(_dtype_of, factors[:n])), list(map(_dtype_of, factors[n:])))


def _factor_grads(
    ctx: Any, need: tuple[bool, ...], g: torch.Tensor, flat: torch.Tensor, grad_low: torch.Tensor, low: torch.Tensor
) -> list[torch.Tensor | None]:
    """Each adapter's ``A`` then ``B`` gradient (``need``: whether each is asked), in its weight's dtype."""
    n = len(ctx.ranks)
    grads_a: list[torch.Tensor | None] = [None] * n
    grads_b: list[torch.Tensor | None] = [None] * n
    if any(need[:n]):
        grads_a = _split(grad_low.t() @ flat, ctx.ranks, 0, ctx.dtypes[0])
    if any(need[n:]):
        grads_b = _columns_grads(g, low, ctx.ranks, ctx.dtypes[1])
    return [*grads_a, *grads_b]


def _columns_grads(
    g: torch.Tensor, low: torch.Tensor, ranks: list[int], dtypes: list[torch.dtype]
) -> list[torch.Tensor | None]:
    """Each adapter's ``B`` gradient ``gᵀ·low_k`` (out, r_k), contiguous, in its weight's dtype.

    Equal ranks and dtypes (the usual case): one batched product writes the blocks one after another,
    (adapters, out, r), and one cast makes every block its weight's gradient as it is (no copy per adapter);
    else one product (out, R) cut into column blocks, each copied."""
    n = len(ranks)
    if n > 1 and len(set(ranks)) == 1 and len(set(dtypes)) == 1:
        per_adapter = low.view(low.shape[0], n, ranks[0]).transpose(0, 1)  # (n, tokens, r)
        blocks = torch.bmm(g.t().expand(n, *g.t().shape), per_adapter)  # (n, out, r)
        return list(blocks.to(dtypes[0]).unbind(0))
    return _split(g.t() @ low, ranks, 1, dtypes)


class RoutedLoraFunction(torch.autograd.Function):
    """``y + ((x·Aᵀ) ⊙ M)·Bᵀ`` as one autograd node, ``A``/``B`` the adapters' factors side by side.

    Inputs: ``y`` (batch, …, out), ``x`` (batch, …, in) in the compute dtype, ``mask`` from
    :func:`column_mask`, then the ``n`` adapters' ``A_k`` (r_k, in) and ``B_k`` (out, r_k) in their
    own dtypes. The factors are cast to ``y``'s dtype as they are concatenated; their gradients
    come back in their own dtypes, each adapter's from its own samples only.
    """

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, *factors: torch.Tensor) -> torch.Tensor:
        n = len(factors) // 2
        a, b = side_by_side(factors[:n], factors[n:], y.dtype)
        flat, low = _low(x, a, mask)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), low, b.t())
        _save(ctx, factors, x, flat, a, b, low, mask)
        return out.view(y.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat, a, b, low, mask = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_low = g @ b  # (tokens, R)
        grad_low.view(mask.shape[0], -1, grad_low.shape[-1]).mul_(mask)
        grad_x = (grad_low @ a).view(ctx.x_shape) if ctx.needs_input_grad[1] else None
        return (grad, grad_x, None, *_factor_grads(ctx, ctx.needs_input_grad[3:], g, flat, grad_low, low))


class RoutedLoraLinearFunction(torch.autograd.Function):
    """A frozen linear layer and its routed LoRA adapters, ``x·Wᵀ + bias + ((x·Aᵀ) ⊙ M)·Bᵀ``, as one autograd node.

    As :class:`RoutedLoraFunction` with the base layer inside (inputs ``x``, ``W``, ``bias``, ``mask``,
    then the factors): the low-rank product is accumulated into the base output in place, and in
    backward the adapters' input gradient into the base's, by ``addmm_`` — no activation-sized
    pass besides the products.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        mask: torch.Tensor,
        *factors: torch.Tensor,
    ) -> torch.Tensor:
        n = len(factors) // 2
        a, b = side_by_side(factors[:n], factors[n:], x.dtype)
        flat, low = _low(x, a, mask)
        y = flat @ weight.t() if bias is None else torch.addmm(bias, flat, weight.t())
        y.addmm_(low, b.t())
        _save(ctx, factors, x, flat, weight, a, b, low, mask)
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat, weight, a, b, low, mask = ctx.saved_tensors
        need_x, need_w, need_bias = ctx.needs_input_grad[:3]
        g = grad.reshape(-1, grad.shape[-1])
        grad_low = g @ b  # (tokens, R)
        grad_low.view(mask.shape[0], -1, grad_low.shape[-1]).mul_(mask)
        grad_x = (g @ weight).addmm_(grad_low, a).view(ctx.x_shape) if need_x else None
        grad_w = g.t() @ flat if need_w else None
        grad_bias = g.sum(0) if need_bias and ctx.has_bias else None
        factor_grads = _factor_grads(ctx, ctx.needs_input_grad[4:], g, flat, grad_low, low)
        return (grad_x, grad_w, grad_bias, None, *factor_grads)


def _split(grad: torch.Tensor, ranks: list[int], dim: int, dtypes: list[torch.dtype]) -> list[torch.Tensor | None]:
    """Each adapter's block of ``grad`` along ``dim``, contiguous, in its weight's dtype (one cast where they agree)."""
    if len(set(dtypes)) == 1 and (dim == 0 or len(ranks) == 1):  # row blocks: contiguous views of one cast
        return list(grad.to(dtypes[0]).split(ranks, dim))
    blocks = grad.split(ranks, dim)
    return [block.to(dtype, memory_format=torch.contiguous_format) for block, dtype in zip(blocks, dtypes, strict=True)]


def routed_lora_add(
    y: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    inference_factors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``y`` plus each routed sample's own adapter's ``s_k·(x·A_kᵀ)·B_kᵀ``, in ``y``'s dtype (``mask``: :func:`column_mask`).

    With autograd, one :class:`RoutedLoraFunction` node; without, :func:`routed_lora` on
    ``inference_factors`` (:func:`side_by_side` of the factors, kept by the caller) when given.
    """
    x = x.to(y.dtype)
    if torch.is_grad_enabled() and any(map(_wants_grad, (y, x, *lora_a, *lora_b))):
        return RoutedLoraFunction.apply(y, x, mask, *lora_a, *lora_b)
    a, b = inference_factors if inference_factors is not None else side_by_side(lora_a, lora_b, y.dtype)
    return routed_lora(y, x, mask, a, b)


def routed_lora_linear_call(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    inference_factors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The linear layer ``(weight, bias)`` and its routed adapters in one step: as :func:`routed_lora_add` on
    the base output, with the base inside (one :class:`RoutedLoraLinearFunction` node with autograd)."""
    tensors = (x, weight, *lora_a, *lora_b) if bias is None else (x, weight, bias, *lora_a, *lora_b)
    if torch.is_grad_enabled() and any(map(_wants_grad, tensors)):
        return RoutedLoraLinearFunction.apply(x, weight, bias, mask, *lora_a, *lora_b)
    a, b = inference_factors if inference_factors is not None else side_by_side(lora_a, lora_b, x.dtype)
    return routed_lora_linear(x, weight, bias, mask, a, b)
