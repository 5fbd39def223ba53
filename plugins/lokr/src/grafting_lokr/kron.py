"""The Kronecker algebra of LoKr: how a size splits in two, ΔW, and ``(W1 ⊗ W2)·x`` without ΔW.

For ``W1`` (a, b) and ``W2`` (c, d), ``W1 ⊗ W2`` is the (a·c, b·d) matrix whose
entry ``[i·c + k, j·d + l]`` is ``W1[i, j] · W2[k, l]``. Seen as a (b, d)
matrix ``X`` (row-major), an input ``x`` of size b·d maps to
``W1 · X · W2ᵀ``, an (a, c) matrix, row-major the output of size a·c: two
products of ``n·b·d·c + n·a·b·c`` multiply-adds for ``n`` inputs, instead
of forming the (out, in) matrix and ``n·a·b·c·d`` for applying it.
"""

from __future__ import annotations

import torch


def split_size(size: int, factor: int = -1) -> tuple[int, int]:
    """Two factors of ``size`` (the smaller first), as PEFT's LoKr splits a weight dimension.

    A positive ``factor`` that divides ``size`` is taken as the first factor as it is
    (it may then be the larger). Otherwise the divisors of ``size`` are walked upwards
    from 1 while the current one is below its cofactor, stopping before a divisor
    larger than ``factor`` (any, for -1): the result is the divisor pair nearest the
    square root, or the largest pair whose first factor stays within ``factor``.
    """
    if factor > 0 and size % factor == 0:
        return factor, size // factor
    limit = size if factor == -1 else factor
    first, second = 1, size
    candidate = 1
    while first < second:
        candidate += 1
        while size % candidate:
            candidate += 1
        if candidate > limit:
            break
        first, second = candidate, size // candidate
    return min(first, second), max(first, second)


def tucker_kernel(core: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor) -> torch.Tensor:
    """The (c, d, kh, kw) kernel ``Σ_ij core[i, j] · w2_a[i, :] ⊗ w2_b[j, :]`` of an effective convolution."""
    return torch.einsum("ijhw,ic,jd->cdhw", core, w2_a, w2_b)


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The Kronecker product with ``torch.kron``'s rule (the tensor of fewer dimensions gets leading 1s).

    Formed by one broadcast product: ``a`` spread over the even axes, ``b`` over the odd
    ones (``torch.kron`` 2.x fails on some shapes with unit dimensions, a 1-d kernel's (k, 1)).
    """
    dims = max(a.dim(), b.dim())
    a_shape = (1,) * (dims - a.dim()) + tuple(a.shape)
    b_shape = (1,) * (dims - b.dim()) + tuple(b.shape)
    spread_a = [size for s in a_shape for size in (s, 1)]
    spread_b = [size for s in b_shape for size in (1, s)]
    product = a.reshape(spread_a) * b.reshape(spread_b)
    return product.reshape([x * y for x, y in zip(a_shape, b_shape)])


def kron_delta(w1: torch.Tensor, w2: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """``scale · (W1 ⊗ W2)`` flattened to (rows, ·), rows scaled by a tensor ``scale`` of shape (rows,).

    ``W2`` may carry kernel dimensions: a 4-d one gets ``W1`` as (a, b, 1, 1), so the
    kernel stays a kernel; any other shape follows ``torch.kron``'s rule, which is the
    layout PEFT saves and merges (for a 3-d ``W2`` it is not a channel-wise product).
    """
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    delta = kron(w1, w2)
    rows = w1.shape[0] * w2.shape[0]
    delta = delta.reshape(rows, -1)
    if isinstance(scale, torch.Tensor):
        return delta * scale[:, None].to(delta.dtype)
    return delta * scale


class _KronLinear(torch.autograd.Function):
    """``W1 · X · W2ᵀ`` per input, keeping only ``x`` and the two small factors for backward.

    Plain autograd would keep the (n·b, c) intermediate ``X W2ᵀ``, as large as the layer's
    input, for the gradient of ``W1``; it is recomputed in backward instead (one small product).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
    ) -> torch.Tensor:
        (a, b), (c, d) = w1.shape, w2.shape
        inner = x.reshape(-1, d) @ w2.t()  # (n·b, c): every row of X times W2ᵀ
        out = torch.matmul(w1, inner.view(-1, b, c))  # (n, a, c): W1 · (X W2ᵀ)
        ctx.save_for_backward(x, w1, w2)
        return out.reshape(*x.shape[:-1], a * c)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, w1, w2 = ctx.saved_tensors  # type: ignore[attr-defined]
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        (a, b), (c, d) = w1.shape, w2.shape
        xs = x.reshape(-1, b, d)
        gy = grad.reshape(-1, a, c)
        g_x = g_w1 = g_w2 = None
        if needs[1]:
            inner = xs.reshape(-1, d) @ w2.t()
            g_w1 = torch.einsum("nac,nbc->ab", gy, inner.view(-1, b, c))
        if needs[0] or needs[2]:
            g_inner = torch.matmul(w1.t(), gy)  # (n, b, c)
            if needs[2]:
                g_w2 = g_inner.reshape(-1, c).t() @ xs.reshape(-1, d)
            if needs[0]:
                g_x = (g_inner.reshape(-1, c) @ w2).view(x.shape)
        return g_x, g_w1, g_w2


def kron_linear(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``x @ (W1 ⊗ W2)ᵀ`` for 2-d ``W1`` (a, b), ``W2`` (c, d) and ``x`` (..., b·d): two small products.

    Values and gradients equal the dense product's up to rounding; backward keeps no
    activation-sized intermediate.
    """
    return _KronLinear.apply(x, w1, w2)  # type: ignore[no-any-return]
