"""LoRA's one-node layer as a ``torch.library`` custom op: one opaque node for ``torch.compile``.

``grafting_lora::lora_linear`` computes ``x·Wᵀ + b + s·(d(x)·Aᵀ)·Bᵀ`` with the kernels of
:class:`~grafting_lora.fused.LoraLinearFunction` (the low-rank product accumulated into the base
output in place, the adapter's input gradient into the base's in backward, no activation-sized
temporary); ``grafting_lora::lora_linear_backward`` is its backward. Both carry fake
(meta) kernels, so Dynamo and AOT autograd trace them without running them, and Inductor
schedules each as a single extern kernel call instead of the separate casts, products and adds
of the plain ops. ``LoraLinear.compiled_form = "op"`` takes this path under ``torch.compile``
(eager keeps the autograd Function; both are the same arithmetic).

The forward returns what backward needs besides the inputs: the rank-``r`` product ``low``,
with dropout the dropped input and its mask (empty tensors without dropout), and the factors
cast to the compute dtype, so that backward casts them no second time (and ``B``'s gradient is
scaled and cast by one kernel): three small kernels per layer backward where there were six.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from grafting_lora.fused import lora_products
from grafting_lora.scaled_products import scaled_product

_NOTHING = (0,)  # the shape of an output that is not needed (a custom op returns tensors, never None)


@torch.library.custom_op("grafting_lora::lora_linear", mutates_args=())
def lora_linear_op(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scaling: float, dropout: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(y, low, h, mask, a, b)``: the output (..., out), ``low = h·aᵀ`` (tokens, r), ``h = d(x)``, dropout's
    mask, and the factors ``a``, ``b`` cast to ``x``'s dtype, which backward reuses.

    Without dropout ``h`` and ``mask`` are empty (``h`` is ``x``, which an output may not alias), and a
    factor already in ``x``'s dtype is returned empty (it would be the input itself).
    """
    flat = x.reshape(-1, x.shape[-1])
    if dropout > 0:
        h, mask = torch.native_dropout(flat, dropout, True)
    else:
        h, mask = flat, flat.new_empty(_NOTHING, dtype=torch.bool)
    a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    y, low = lora_products(flat, h, weight, bias, a, b, scaling)
    kept = h if dropout > 0 else x.new_empty(_NOTHING)
    cast_a, cast_b = (cast if cast is not lora else x.new_empty(_NOTHING) for cast, lora in ((a, lora_a), (b, lora_b)))
    return y.view(*x.shape[:-1], y.shape[-1]), low, kept, mask, cast_a, cast_b


@lora_linear_op.register_fake
def _(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scaling: float, dropout: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    tokens = x.numel() // x.shape[-1]
    dropped = (tokens, x.shape[-1]) if dropout > 0 else _NOTHING
    return (
        x.new_empty((*x.shape[:-1], weight.shape[0])),
        x.new_empty((tokens, lora_a.shape[0])),
        x.new_empty(dropped),
        x.new_empty(dropped, dtype=torch.bool),
        x.new_empty(lora_a.shape if lora_a.dtype != x.dtype else _NOTHING),
        x.new_empty(lora_b.shape if lora_b.dtype != x.dtype else _NOTHING),
    )


@torch.library.custom_op("grafting_lora::lora_linear_backward", mutates_args=())
def lora_linear_backward_op(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    a: Tensor,
    b: Tensor,
    low: Tensor,
    h: Tensor,
    mask: Tensor,
    scaling: float,
    dropout: float,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(grad_x, grad_w, grad_a, grad_b)``, ``grad_x`` (tokens, in); ``needs`` says which (the others empty).

    ``x`` is the layer's input, or with dropout and a frozen ``W`` only something of its shape (``h``).
    ``a`` and ``b`` are the forward's factors in the compute dtype (empty: ``A`` or ``B`` is in it already);
    ``A`` and ``B`` give the gradients' dtypes. ``B``'s gradient is scaled and cast by one kernel.
    """
    need_x, need_w, need_a, need_b = needs
    a = lora_a if a.numel() == 0 else a
    b = lora_b if b.numel() == 0 else b
    g = grad.reshape(-1, grad.shape[-1])
    flat = x.reshape(-1, x.shape[-1])
    grad_low = scaled_product(g, b, g.dtype, scaling)  # (tokens, r): small, the scaling as the product's alpha
    grad_x, grad_w, grad_a, grad_b = (g.new_empty(_NOTHING) for _ in range(4))  # outputs never alias each other
    if need_x and dropout <= 0:  # the skinny product first, the base's accumulated onto it
        grad_x = (grad_low @ a).addmm_(g, weight)
    elif need_x:  # the adapter's input gradient through the mask, the base's accumulated onto it
        dropped = torch.ops.aten.native_dropout_backward(grad_low @ a, mask, 1.0 / (1.0 - dropout))
        grad_x = dropped.addmm_(g, weight)
    if need_w:
        grad_w = g.t() @ flat
    if need_a:
        grad_a = scaled_product(grad_low.t(), h if dropout > 0 else flat, lora_a.dtype)
    if need_b:
        grad_b = scaled_product(g.t(), low, lora_b.dtype, scaling)  # scaled and cast by the product (or one kernel)
    return grad_x, grad_w, grad_a, grad_b


@lora_linear_backward_op.register_fake
def _(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    a: Tensor,
    b: Tensor,
    low: Tensor,
    h: Tensor,
    mask: Tensor,
    scaling: float,
    dropout: float,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    shapes = ((x.numel() // x.shape[-1], x.shape[-1]), weight.shape, lora_a.shape, lora_b.shape)
    dtypes = (x.dtype, weight.dtype, lora_a.dtype, lora_b.dtype)
    return tuple(  # type: ignore[return-value]
        grad.new_empty(shape if need else _NOTHING, dtype=dtype if need else grad.dtype)
        for shape, dtype, need in zip(shapes, dtypes, needs, strict=True)
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    x, weight, bias, lora_a, lora_b, scaling, dropout = inputs
    _, low, h, mask, a, b = output
    keep_x = dropout <= 0 or ctx.needs_input_grad[1]  # the undropped input only for W's own gradient
    ctx.save_for_backward(x if keep_x else None, weight, lora_a, lora_b, a, b, low, h, mask)
    ctx.x_shape = x.shape
    ctx.scaling, ctx.dropout, ctx.has_bias = scaling, dropout, bias is not None


def _backward(ctx: Any, grad: Tensor, *_unused: Tensor | None) -> tuple[Any, ...]:
    """The gradients of the op's inputs from its output's (``low``, ``h``, the mask and the cast factors get none)."""
    x, weight, lora_a, lora_b, a, b, low, h, mask = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    needs = [need_x, need_w, need_a, need_b]
    x = h if x is None else x
    grads = lora_linear_backward_op(
        grad, x, weight, lora_a, lora_b, a, b, low, h, mask, ctx.scaling, ctx.dropout, needs
    )
    grad_x, grad_w, grad_a, grad_b = (value if need else None for value, need in zip(grads, needs, strict=True))
    grad_x = None if grad_x is None else grad_x.view(ctx.x_shape)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if need_bias and ctx.has_bias else None
    return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None


lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


def lora_linear_node(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scaling: float, dropout: float = 0.0
) -> Tensor:
    """``base(x) + lora_delta(x)`` through ``grafting_lora::lora_linear``: the same values as ``LoraLinearFunction``."""
    return lora_linear_op(x, weight, bias, lora_a, lora_b, scaling, dropout)[0]
