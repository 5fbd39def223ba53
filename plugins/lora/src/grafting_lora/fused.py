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
runs as plain ops (:func:`lora_linear`, :func:`dora_linear`).

Each is checked against the reference (``LoraLinear.fused = False``: the layer computes
``reference.lora_delta`` / ``reference.dora_delta``) for values and gradients.
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


#: The DoRA node's backward puts the scale ``s`` on the (out, in) weight rather than on the
#: (tokens, out) gradient when tokens exceed this many times the input width (the weight-sized
#: pass is then the smaller; the gradient-side form launches two kernels fewer).
WEIGHT_SIDE_ABOVE = 4.0


def _mul_as(x: torch.Tensor, y: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """``x * y`` written in ``dtype``: the product and the cast as one kernel."""
    out = x.new_empty(x.shape, dtype=dtype)
    return torch.mul(x, y, out=out)


def dora_norm_squared(
    weight: torch.Tensor,
    weight_sq: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    cast_a: torch.Tensor | None = None,
) -> torch.Tensor:
    """``‖W + scaling·B·A‖²`` per row in float32 (clamped at 0), without forming ``W + ΔW``.

    ``‖W + ΔW‖² = ‖W‖² + s·⟨B, 2·W·Aᵀ + s·B·(A·Aᵀ)⟩`` row by row: ``weight_sq`` is ``‖W‖²`` (the
    frozen weight's, computed once), ``W·Aᵀ`` is one skinny product in W's dtype (accumulated
    in float32 by the matrix unit), the rest is (out, r) and (r, r) work: the inner products
    and the ``‖W‖²`` term as one ``baddbmm``. ``cast_a`` is ``A`` already in W's dtype, if the
    caller has it. The error is of the order of W's rounding times ``‖W‖·‖ΔW‖``: relative to
    ``‖W + ΔW‖²`` it grows where a row of ``ΔW`` nearly cancels the row of ``W``.
    """
    a, b = lora_a.float(), lora_b.float()
    cast_a = lora_a.to(weight.dtype) if cast_a is None else cast_a
    inner = torch.addmm((weight @ cast_a.t()).float(), b, a @ a.t(), beta=2.0, alpha=scaling)
    # ‖W‖² + s·⟨B_o, inner_o⟩ for every row o, as a batch of (1, r)·(r, 1) products
    rows = torch.baddbmm(weight_sq.view(-1, 1, 1), b.unsqueeze(1), inner.unsqueeze(2), alpha=scaling)
    return rows.view(-1).clamp_min_(0)


def dora_inverse_norm(
    weight: torch.Tensor,
    weight_sq: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    cast_a: torch.Tensor | None = None,
) -> torch.Tensor:
    """``1 / ‖W + scaling·B·A‖`` per row in float32: what DoRA's scale and magnitude gradient multiply by."""
    return dora_norm_squared(weight, weight_sq, lora_a, lora_b, scaling, cast_a).rsqrt_()


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """The forward of :class:`DoraLinearFunction` as plain ops (no autograd node), for inference."""
    z = lora_linear(x, weight, None, lora_a, lora_b, scaling)  # (W + ΔW)·x, no bias
    return _scaled(z, scale, bias)


def _scaled(z: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``z ⊙ s + bias`` in ``z``'s dtype, one kernel (``s`` rounded to that dtype first: an activation-sized
    product of two dtypes takes the GPU's slow type-converting elementwise path, 4x the time on an H100)."""
    scale = scale.to(z.dtype)
    return torch.mul(z, scale) if bias is None else torch.addcmul(bias, z, scale)


class DoraLinearFunction(torch.autograd.Function):
    """Fast path of DoRA's layer ``base(x) + dora_delta``, dropout included, as one autograd node.

    ``s = m / ‖W + ΔW‖`` per output row (the norm a constant for autograd, as in the reference),
    ``h = d(x)`` dropout with probability ``dropout`` (drawn as ``nn.Dropout`` draws it):

    * without dropout: ``y = s ⊙ z + b`` with ``z = x·Wᵀ + scaling·(x·Aᵀ)·Bᵀ``;
    * with dropout (PEFT's DoRA: the base product of the dropped input):
      ``y = x·Wᵀ + b − h·Wᵀ + s ⊙ z`` with ``z = h·Wᵀ + scaling·(h·Aᵀ)·Bᵀ``.

    Forward: the inverse row norms from ``‖W‖²`` (:func:`dora_inverse_norm`), the low-rank
    product accumulated into ``z`` by ``addmm``, ``s`` (float32, never rounded to the compute
    dtype: each product with it rounds once) and the bias applied by one ``addcmul``. Backward: the magnitude's gradient
    ``Σ_tokens g ⊙ z / ‖W + ΔW‖``; ``s`` goes onto the (tokens, out) gradient once, or onto the
    rows of ``W`` and ``B`` when the activations are much larger than the weight
    (:data:`WEIGHT_SIDE_ABOVE`, no dropout); the scaling and the cast to the adapter's dtype of
    each factor's gradient are one kernel.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        magnitude: torch.Tensor,
        weight_sq: torch.Tensor,
        scaling: float,
        dropout: float = 0.0,
    ) -> torch.Tensor:
        dtype = x.dtype
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        inv = dora_inverse_norm(weight, weight_sq, lora_a, lora_b, scaling, a if weight.dtype == dtype else None)
        scale = magnitude.view(-1) * inv  # float32 (or float64)
        flat = x.reshape(-1, x.shape[-1])
        if dropout > 0:
            h, mask = torch.native_dropout(flat, dropout, True)
            base = flat @ weight.t() if bias is None else torch.addmm(bias, flat, weight.t())
            plain = h @ weight.t()
            low = h @ a.t()
            z = torch.addmm(plain, low, b.t(), alpha=scaling)  # W·h + scaling·B·A·h
            y = base.sub_(plain).addcmul_(z, scale.to(z.dtype))
            keep_x = ctx.needs_input_grad[1]  # the undropped input only for W's own gradient
            ctx.save_for_backward(flat if keep_x else None, h, mask, weight, a, b, low, z, scale, inv)
        else:
            z, low = lora_products(flat, flat, weight, None, a, b, scaling)  # (W + ΔW)·x, no bias
            y = _scaled(z, scale, bias)
            ctx.save_for_backward(flat, None, None, weight, a, b, low, z, scale, inv)
        ctx.scaling = scaling
        ctx.keep = 1.0 - dropout
        ctx.x_shape = x.shape
        ctx.dtypes = (lora_a.dtype, lora_b.dtype, magnitude.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat, h, mask, weight, a, b, low, z, scale, inv = ctx.saved_tensors
        need_bias, need_m = ctx.needs_input_grad[2], ctx.needs_input_grad[5]
        g = grad.reshape(-1, grad.shape[-1])
        grad_m = grad_bias = None
        if need_m:
            grad_m = _mul_as(torch.sum(g * z, 0, dtype=torch.float32), inv, ctx.dtypes[2])
        if need_bias:
            grad_bias = g.sum(0)
        if mask is not None:
            grads = _dropout_backward(ctx, g, flat, h, mask, weight, a, b, low, scale)
        elif g.shape[0] > WEIGHT_SIDE_ABOVE * weight.shape[1]:
            grads = _weight_side_backward(ctx, g, flat, weight, a, b, low, scale)
        else:
            grads = _gradient_side_backward(ctx, g, flat, weight, a, b, low, scale)
        grad_x, grad_w, grad_a, grad_b = grads
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, grad_m, None, None, None


Grads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def _gradient_side_backward(
    ctx: Any,
    g: torch.Tensor,
    flat: torch.Tensor,
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    low: torch.Tensor,
    scale: torch.Tensor,
) -> Grads:
    """``(x, W, A, B)`` gradients of ``y = s ⊙ z``: ``z``'s gradient ``g ⊙ s`` formed once, (tokens, out)."""
    need_x, need_w, _, need_a, need_b = ctx.needs_input_grad[:5]
    gz = g * scale.to(g.dtype)
    grad_low = gz @ b  # (tokens, r), without the scaling
    grad_x = (gz @ weight).addmm_(grad_low, a, alpha=ctx.scaling) if need_x else None
    grad_w = gz.t() @ flat if need_w else None
    grad_a = _mul_as(grad_low.t() @ flat, ctx.scaling, ctx.dtypes[0]) if need_a else None
    grad_b = _mul_as(gz.t() @ low, ctx.scaling, ctx.dtypes[1]) if need_b else None
    return grad_x, grad_w, grad_a, grad_b


def _weight_side_backward(
    ctx: Any,
    g: torch.Tensor,
    flat: torch.Tensor,
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    low: torch.Tensor,
    scale: torch.Tensor,
) -> Grads:
    """As :func:`_gradient_side_backward`, ``s`` put on the rows of ``W`` and ``B`` (weight-sized, not activation-sized)."""
    need_x, need_w, _, need_a, need_b = ctx.needs_input_grad[:5]
    rows = scale[:, None]
    grad_low = g @ _mul_as(b, rows, b.dtype)  # without the scaling
    grad_x = (g @ _mul_as(weight, rows, weight.dtype)).addmm_(grad_low, a, alpha=ctx.scaling) if need_x else None
    grad_w = (g.t() @ flat).mul_(rows) if need_w else None
    grad_a = _mul_as(grad_low.t() @ flat, ctx.scaling, ctx.dtypes[0]) if need_a else None
    grad_b = _mul_as((g.t() @ low).mul_(rows), ctx.scaling, ctx.dtypes[1]) if need_b else None
    return grad_x, grad_w, grad_a, grad_b


def _dropout_backward(
    ctx: Any,
    g: torch.Tensor,
    flat: torch.Tensor | None,
    h: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    low: torch.Tensor,
    scale: torch.Tensor,
) -> Grads:
    """``(x, W, A, B)`` gradients of ``y = x·Wᵀ − h·Wᵀ + s ⊙ z``, ``h = d(x)``.

    ``h·Wᵀ``'s gradient is ``g ⊙ (s − 1)``, with ``s − 1`` in float32 (``g ⊙ s − g`` would
    cancel: ``s`` is near 1); the dropped input's gradient goes through the mask in place and the
    base's gradient ``g·W`` is accumulated onto it.
    """
    need_x, need_w, _, need_a, need_b = ctx.needs_input_grad[:5]
    gz = g * scale.to(g.dtype)
    grad_low = gz @ b  # (tokens, r), without the scaling
    grad_x = grad_w = grad_a = grad_b = None
    if need_x or need_w:
        gh = g * (scale - 1.0).to(g.dtype)
    if need_x:
        grad_h = (gh @ weight).addmm_(grad_low, a, alpha=ctx.scaling)
        grad_x = torch.ops.aten.native_dropout_backward(grad_h, mask, 1.0 / ctx.keep).addmm_(g, weight)
    if need_w:
        grad_w = (g.t() @ flat).addmm_(gh.t(), h)
    if need_a:
        grad_a = _mul_as(grad_low.t() @ h, ctx.scaling, ctx.dtypes[0])
    if need_b:
        grad_b = _mul_as(gz.t() @ low, ctx.scaling, ctx.dtypes[1])
    return grad_x, grad_w, grad_a, grad_b
