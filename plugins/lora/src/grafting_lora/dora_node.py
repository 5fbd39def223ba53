"""DoRA's layer as one autograd node: the fast path of ``base(x) + reference.dora_delta``.

Built on :mod:`grafting_lora.fused`'s LoRA products (:func:`~grafting_lora.fused.lora_products`):
the row norms ``‖W + ΔW‖`` come from the frozen ``‖W‖²`` and a skinny product
(:func:`dora_norm_squared`), the scale ``s = m / ‖W + ΔW‖`` is applied once to the layer's
output. Without autograd the same forward runs as plain ops (:func:`dora_linear`).

Checked against the reference (``LoraLinear.fused = False``: the layer computes
``reference.dora_delta``) for values and gradients.
"""

from __future__ import annotations

from typing import Any

import torch

from grafting_lora.dora_kernels import norm_squared, row_scales, scaled_gradient
from grafting_lora.fused import lora_linear, lora_products
from grafting_lora.scaled_products import mul_as, scaled_product

#: The DoRA node's backward puts the scale ``s`` on the (out, in) weight rather than on the
#: (tokens, out) gradient when tokens exceed this many times the input width (the weight-sized
#: pass is then the smaller; the gradient-side form launches two kernels fewer).
WEIGHT_SIDE_ABOVE = 4.0


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
    a = lora_a.float()
    cast_a = lora_a.to(weight.dtype) if cast_a is None else cast_a
    return norm_squared(weight @ cast_a.t(), a @ a.t(), lora_b.float(), weight_sq, scaling)


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

    Forward: the inverse row norms and ``s`` from ``‖W‖²`` (:func:`~grafting_lora.dora_kernels.row_scales`:
    two skinny products and one kernel), the low-rank product accumulated into ``z`` by ``addmm``, ``s``
    (rounded to the compute dtype: a product of two dtypes takes the GPU's slow converting
    kernel) and the bias applied by one ``addcmul``. Backward: one pass over ``g`` and ``z``
    (:func:`~grafting_lora.dora_kernels.scaled_gradient`) gives the magnitude's gradient
    ``Σ_tokens g ⊙ z / ‖W + ΔW‖`` and ``z``'s gradient ``g ⊙ s``, or ``s`` goes onto the rows of
    ``W`` and ``B`` instead when the activations are much larger than the weight
    (:data:`WEIGHT_SIDE_ABOVE`, no dropout); the scaling and the cast to the adapter's dtype of
    each factor's gradient are one kernel.

    ``z`` is kept for backward rather than recovered from ``y`` as ``(y − b) / s``: that would
    save no pass (backward reads ``y`` instead of ``z``), its error is ``u·|y|/s`` (``u`` the
    dtype's unit roundoff), unbounded relative to ``z`` where the bias dominates ``s ⊙ z``, it
    is undefined where ``m`` (so ``s``) is 0 (a row whose magnitude a step drove to zero would
    get no gradient back), and with dropout ``y`` mixes in ``x·Wᵀ − h·Wᵀ``.
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
        if weight.dtype != dtype:
            raise ValueError(f"DoRA's node takes the input in the weight's dtype, not {dtype} and {weight.dtype}")
        # up = scaling·B and a = A in the compute dtype: the low-rank product's factors, and backward's
        inv, scale, half, up, a = row_scales(weight, lora_a, lora_b, weight_sq, magnitude, scaling)
        flat = x.reshape(-1, x.shape[-1])
        if dropout > 0:
            h, mask = torch.native_dropout(flat, dropout, True)
            base = flat @ weight.t() if bias is None else torch.addmm(bias, flat, weight.t())
            plain = h @ weight.t()
            low = h @ a.t()
            z = torch.addmm(plain, low, up.t())  # W·h + scaling·B·A·h
            y = base.sub_(plain).addcmul_(z, half)
            keep_x = ctx.needs_input_grad[1]  # the undropped input only for W's own gradient
            ctx.save_for_backward(flat if keep_x else None, h, mask, weight, a, up, low, z, scale, half, inv)
        else:
            z, low = lora_products(flat, flat, weight, None, a, up, 1.0)  # (W + ΔW)·x, no bias
            y = _scaled(z, half, bias)
            ctx.save_for_backward(flat, None, None, weight, a, up, low, z, scale, half, inv)
        ctx.scaling = scaling
        ctx.keep = 1.0 - dropout
        ctx.x_shape = x.shape
        ctx.dtypes = (lora_a.dtype, lora_b.dtype, magnitude.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat, h, mask, weight, a, up, low, z, scale, half, inv = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b, need_m = ctx.needs_input_grad[:6]
        g = grad.reshape(-1, grad.shape[-1])
        weight_side = mask is None and g.shape[0] > WEIGHT_SIDE_ABOVE * weight.shape[1]
        # g ⊙ s (z's gradient) unless s goes on the weight rows; g ⊙ (s − 1) for dropout's h·Wᵀ; the
        # magnitude's gradient: one pass over g and z
        gz, gh, grad_m = scaled_gradient(
            g,
            z,
            scale,
            half,
            inv,
            write_gz=not weight_side and (need_x or need_w or need_a or need_b),
            write_gh=mask is not None and (need_x or need_w),
            reduce=need_m,
        )
        if grad_m is not None:
            grad_m = grad_m.to(ctx.dtypes[2])
        grad_bias = g.sum(0) if need_bias else None
        if mask is not None:
            grads = _dropout_backward(ctx, g, gz, gh, flat, h, mask, weight, a, up, low)
        elif weight_side:
            grads = _weight_side_backward(ctx, g, flat, weight, a, up, low, scale)
        else:
            grads = _gradient_side_backward(ctx, gz, flat, weight, a, up, low)
        grad_x, grad_w, grad_a, grad_b = grads
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, grad_m, None, None, None


Grads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def _gradient_side_backward(
    ctx: Any,
    gz: torch.Tensor | None,
    flat: torch.Tensor,
    weight: torch.Tensor,
    a: torch.Tensor,
    up: torch.Tensor,
    low: torch.Tensor,
) -> Grads:
    """``(x, W, A, B)`` gradients of ``y = s ⊙ z`` from ``z``'s gradient ``gz = g ⊙ s`` (tokens, out);
    ``up`` is ``scaling·B``."""
    need_x, need_w, _, need_a, need_b = ctx.needs_input_grad[:5]
    if gz is None:  # no gradient asked for but the magnitude's
        return None, None, None, None
    grad_low = gz @ up  # (tokens, r), the scaling included
    grad_x = (gz @ weight).addmm_(grad_low, a) if need_x else None
    grad_w = gz.t() @ flat if need_w else None
    grad_a = scaled_product(grad_low.t(), flat, ctx.dtypes[0]) if need_a else None
    grad_b = scaled_product(gz.t(), low, ctx.dtypes[1], ctx.scaling) if need_b else None
    return grad_x, grad_w, grad_a, grad_b


def _weight_side_backward(
    ctx: Any,
    g: torch.Tensor,
    flat: torch.Tensor,
    weight: torch.Tensor,
    a: torch.Tensor,
    up: torch.Tensor,
    low: torch.Tensor,
    scale: torch.Tensor,
) -> Grads:
    """As :func:`_gradient_side_backward`, ``s`` put on the rows of ``W`` and ``B`` (weight-sized, not activation-sized)."""
    need_x, need_w, _, need_a, need_b = ctx.needs_input_grad[:5]
    rows = scale[:, None]
    grad_low = g @ mul_as(up, rows, up.dtype)  # the scaling included
    grad_x = (g @ mul_as(weight, rows, weight.dtype)).addmm_(grad_low, a) if need_x else None
    grad_w = (g.t() @ flat).mul_(rows) if need_w else None
    grad_a = scaled_product(grad_low.t(), flat, ctx.dtypes[0]) if need_a else None
    grad_b = mul_as((g.t() @ low).mul_(rows), ctx.scaling, ctx.dtypes[1]) if need_b else None
    return grad_x, grad_w, grad_a, grad_b


def _dropout_backward(
    ctx: Any,
    g: torch.Tensor,
    gz: torch.Tensor | None,
    gh: torch.Tensor | None,
    flat: torch.Tensor | None,
    h: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    a: torch.Tensor,
    up: torch.Tensor,
    low: torch.Tensor,
) -> Grads:
    """``(x, W, A, B)`` gradients of ``y = x·Wᵀ − h·Wᵀ + s ⊙ z``, ``h = d(x)``, from ``gz = g ⊙ s``
    (``up`` is ``scaling·B``).

    ``h·Wᵀ``'s gradient is ``gh = g ⊙ (s − 1)`` (:func:`~grafting_lora.dora_kernels.scaled_gradient`:
    ``s − 1`` in float32); the dropped input's gradient goes through the mask in place and the
    base's gradient ``g·W`` is accumulated onto it.
    """
    need_x, need_w, _, need_a, need_b = ctx.needs_input_grad[:5]
    if gz is None or (gh is None and (need_x or need_w)):  # no gradient asked for but the magnitude's
        return None, None, None, None
    grad_low = gz @ up  # (tokens, r), the scaling included
    grad_x = grad_w = grad_a = grad_b = None
    if need_x:
        grad_h = (gh @ weight).addmm_(grad_low, a)
        grad_x = torch.ops.aten.native_dropout_backward(grad_h, mask, 1.0 / ctx.keep).addmm_(g, weight)
    if need_w:
        grad_w = (g.t() @ flat).addmm_(gh.t(), h)
    if need_a:
        grad_a = scaled_product(grad_low.t(), h, ctx.dtypes[0])
    if need_b:
        grad_b = scaled_product(gz.t(), low, ctx.dtypes[1], ctx.scaling)
    return grad_x, grad_w, grad_a, grad_b
