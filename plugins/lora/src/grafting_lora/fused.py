"""Fast paths of :mod:`grafting_lora.reference`: a frozen linear layer and its LoRA (or DoRA) delta as one node.

``base(x) + lora_delta(x)`` = ``x·Wᵀ + b + s·(d(x)·Aᵀ)·Bᵀ``, in the layer's half precision:
the base product is accumulated by ``addmm_`` into the low-rank product's output in forward
(:func:`lora_products`, shared by every forward here), and the base's input gradient into the
adapter's input gradient in backward (the skinny product writes the output once, the
compute-bound one reads it in its epilogue), so no elementwise pass over an activation is
left and the whole layer is one node for autograd to run; dropout on the adapter's input
is drawn inside the node and its mask applied to the adapter's input gradient in place.
Weights of the adapter stay in their own (float32) dtype: they are cast down for the
products and their gradients come back in their dtype. Without autograd the same forward
runs as plain ops (:func:`lora_linear`); DoRA's node is :mod:`grafting_lora.dora_node`.

Each is checked against the reference (``LoraLinear.fused = False``: the layer computes
``reference.lora_delta``) for values and gradients.
"""

from __future__ import annotations

from typing import Any

import torch

from grafting_lora.factor_casts import FactorCasts
from grafting_lora.scaled_products import scaled_product


def lora_products(
    flat: torch.Tensor,
    h: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor | None,
    b: torch.Tensor,
    scaling: float,
    low: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, low)``: ``y = scaling·low·bᵀ + bias + flat·Wᵀ`` with ``low = h·aᵀ`` (unless given: a grouped product).

    The skinny product comes first and writes the output once (the scaling as its ``alpha``, the
    bias added in its epilogue); the base product, the one that is compute-bound, then accumulates
    into it (``addmm_``, which reads ``y`` in its epilogue), rather than a rank-r ``addmm_`` reading
    and writing the whole (tokens, out) output a second time after the base product.
    """
    if low is None:
        if h is None or a is None:
            raise ValueError("the low-rank product needs the input and A, or the product itself")
        low = h @ a.t()
    up = b.t()  # (r, out)
    y = scaled_product(low, up, low.dtype, scaling) if bias is None else torch.addmm(bias, low, up, alpha=scaling)
    y.addmm_(flat, weight.t())
    return y, low


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    low: torch.Tensor | None = None,
    casts: FactorCasts | None = None,
) -> torch.Tensor:
    """The forward of :class:`LoraLinearFunction` as plain ops (no autograd node), for inference.

    ``low`` is ``x·Aᵀ`` when the caller has it (shared-input grouping); ``lora_a`` is then not read.
    ``casts`` keeps the factors cast to ``x``'s dtype between calls (the adapter's :class:`FactorCasts`).
    """
    b = lora_b.to(x.dtype) if casts is None else casts.cast("B", lora_b, x.dtype)
    flat = x.reshape(-1, x.shape[-1])
    if low is not None:
        y, _ = lora_products(flat, None, weight, bias, None, b, scaling, low.reshape(-1, low.shape[-1]))
    else:
        a = lora_a.to(x.dtype) if casts is None else casts.cast("A", lora_a, x.dtype)
        y, _ = lora_products(flat, flat, weight, bias, a, b, scaling)
    return y.view(*x.shape[:-1], y.shape[-1])


class LoraLinearFunction(torch.autograd.Function):
    """Fast path of ``base(x) + lora_delta(x)``: ``x·Wᵀ + b + scaling·(d(x)·Aᵀ)·Bᵀ`` as one autograd node.

    ``x`` (..., in), ``W`` (out, in), ``A`` (r, in), ``B`` (out, r).

    ``d`` is dropout with probability ``dropout`` (0: none), drawn as ``nn.Dropout`` draws it
    (one ``native_dropout`` over ``x``, so a seed gives the reference path's mask). Backward
    keeps the dropped input (A's gradient) and the mask: the adapter's input gradient is
    masked in place and the base's is accumulated onto it by one ``addmm_``.

    The scaling is each product's ``alpha`` (:func:`~grafting_lora.scaled_products.scaled_product`):
    forward's ``low·Bᵀ``, backward's ``g·B`` (so ``A``'s and the input's gradients carry it) and
    ``gᵀ·low``; the factors are cast to the input's dtype once each, and their gradients are
    written in the factors' dtype by the product itself where the device can (CUDA), else by
    one cast (or scale-and-cast) kernel.

    ``low`` (..., r), when given, is ``x·Aᵀ`` already computed (shared-input grouping: one matmul
    for the sibling layers' ``A``); the node then takes it as an input, returns its gradient and
    none for ``A`` (which gets its gradient through the grouped product); no dropout then.
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
        dropout: float = 0.0,
        low: torch.Tensor | None = None,
    ) -> torch.Tensor:
        dtype = x.dtype
        flat = x.reshape(-1, x.shape[-1])
        b = lora_b.to(dtype)
        ctx.grouped = low is not None
        if low is not None:  # x·Aᵀ computed with the siblings' products: A is not read here
            if dropout > 0:
                raise ValueError("a precomputed low-rank product cannot be combined with dropout")
            y, low = lora_products(flat, None, weight, bias, None, b, scaling, low.reshape(-1, low.shape[-1]))
            ctx.save_for_backward(flat if ctx.needs_input_grad[1] else None, None, weight, None, b, low, None)
            ctx.low_shape = (*x.shape[:-1], low.shape[-1])
        else:
            a = lora_a.to(dtype)
            h, mask = torch.native_dropout(flat, dropout, True) if dropout > 0 else (flat, None)
            y, low = lora_products(flat, h, weight, bias, a, b, scaling)
            keep_x = mask is None or ctx.needs_input_grad[1]  # the undropped input only for W's own gradient
            ctx.save_for_backward(flat if keep_x else None, h, weight, a, b, low, mask)
        ctx.scaling = scaling
        ctx.keep = 1.0 - dropout
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        ctx.dtypes = (lora_a.dtype, lora_b.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat, h, weight, a, b, low, mask = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        g = grad.reshape(-1, grad.shape[-1])
        grad_low = scaled_product(g, b, g.dtype, ctx.scaling)  # (tokens, r): small, the scaling included
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if need_w:
            grad_w = g.t() @ flat
        if need_bias and ctx.has_bias:
            grad_bias = g.sum(0)
        if need_b:
            grad_b = scaled_product(g.t(), low, ctx.dtypes[1], ctx.scaling)
        if ctx.grouped:  # the adapter's input gradient flows through the grouped product
            grad_x = (g @ weight).view(ctx.x_shape) if need_x else None
            grad_low_in = grad_low.view(ctx.low_shape) if ctx.needs_input_grad[7] else None
            return grad_x, grad_w, grad_bias, None, grad_b, None, None, grad_low_in
        if need_x and mask is None:  # the skinny product first, the base's accumulated onto it
            grad_x = (grad_low @ a).addmm_(g, weight).view(ctx.x_shape)
        elif need_x:  # the adapter's input gradient through dropout's mask, the base's accumulated onto it
            dropped = torch.ops.aten.native_dropout_backward(grad_low @ a, mask, 1.0 / ctx.keep)
            grad_x = dropped.addmm_(g, weight).view(ctx.x_shape)
        if need_a:
            grad_a = scaled_product(grad_low.t(), h, ctx.dtypes[0])
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None
