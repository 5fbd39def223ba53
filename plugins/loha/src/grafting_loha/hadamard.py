"""The LoHa product and its two exact evaluations.

``ΔW = (L1·R1) ⊙ (L2·R2) · s`` with ``L`` of shape (out, r) and ``R`` of shape
(r, in). Entry by entry, ``ΔW[o, i] = Σ_ab L1[o,a] L2[o,b] · R1[a,i] R2[b,i] · s``,
so ``ΔW = U·V`` with ``U = rowkron(L1, L2)·s`` (out, r²) and
``V = colkron(R1, R2)`` (r², in): a rank-r² product that never forms the
(out, in) matrix. Applying it to n inputs costs ``n·r²·(in+out)``
multiply-adds against ``n·in·out`` for the dense ``ΔW``, plus the one-off
cost of building the factors; :func:`prefer_factored` picks the cheaper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def row_kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(m, p), (m, q) -> (m, p·q): row ``k`` is the Kronecker product of rows ``k`` of ``a`` and ``b``."""
    return (a[:, :, None] * b[:, None, :]).reshape(a.shape[0], -1)


def col_kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(p, n), (q, n) -> (p·q, n): column ``k`` is the Kronecker product of columns ``k`` of ``a`` and ``b``."""
    return (a[:, None, :] * b[None, :, :]).reshape(-1, a.shape[1])


class _HadamardProduct(torch.autograd.Function):
    """``(L1·R1) ⊙ (L2·R2)`` keeping only the four factors for backward (the products are recomputed).

    Plain autograd would keep both (out, in) products alive until backward;
    the gradients are the same operations either way, so the same bits.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, l1: torch.Tensor, r1: torch.Tensor, l2: torch.Tensor, r2: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(l1, r1, l2, r2)
        return (l1 @ r1) * (l2 @ r2)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        l1, r1, l2, r2 = ctx.saved_tensors  # type: ignore[attr-defined]
        need = ctx.needs_input_grad  # type: ignore[attr-defined]
        g1 = grad * (l2 @ r2) if need[0] or need[1] else None
        g2 = grad * (l1 @ r1) if need[2] or need[3] else None
        return (
            g1 @ r1.T if need[0] else None,
            l1.T @ g1 if need[1] else None,
            g2 @ r2.T if need[2] else None,
            l2.T @ g2 if need[3] else None,
        )


def dense_delta(
    l1: torch.Tensor, r1: torch.Tensor, l2: torch.Tensor, r2: torch.Tensor, row_scale: torch.Tensor | float
) -> torch.Tensor:
    """``(L1·R1) ⊙ (L2·R2)``, rows scaled by ``row_scale`` (a number or an (out,) vector)."""
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in (l1, r1, l2, r2))
    delta = _HadamardProduct.apply(l1, r1, l2, r2) if grads else (l1 @ r1) * (l2 @ r2)
    if isinstance(row_scale, torch.Tensor):
        return delta * row_scale[:, None]
    return delta * row_scale


def factored_delta(
    l1: torch.Tensor, r1: torch.Tensor, l2: torch.Tensor, r2: torch.Tensor, row_scale: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, V)`` with ``U·V == dense_delta(...)``: U (out, r²) carries the row scale, V is (r², in)."""
    u = row_kron(l1, l2)
    u = u * (row_scale[:, None] if isinstance(row_scale, torch.Tensor) else row_scale)
    return u, col_kron(r1, r2)


def prefer_factored(n_out: int, n_in: int, rank: int, positions: int) -> bool:
    """Whether ``U·(V·x)`` costs fewer multiply-adds than ``ΔW·x`` for ``positions`` inputs.

    Dense: build ΔW (two rank-r products, ``2r·in·out``) and apply it
    (``positions·in·out``). Factored: build U and V (``r²·(in+out)``) and
    apply both (``positions·r²·(in+out)``). The backward pass costs about
    twice the forward on either path, so the forward decides.
    """
    dense = n_out * n_in * (positions + 2 * rank)
    factored = rank * rank * (n_out + n_in) * (positions + 1)
    return factored < dense


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha · a @ b`` in one GEMM (the addend is a view of ``b``, ignored at ``beta=0``)."""
    return torch.addmm(b[0], a, b, beta=0, alpha=alpha)


class _FactoredLinear(torch.autograd.Function):
    """``scale · x Vᵀ Uᵀ`` with ``U = rowkron(L1, L2)``, ``V = colkron(R1, R2)`` built in ``dtype``.

    One autograd node with the fewest kernels: two products build U and V
    directly in the compute dtype, two GEMMs apply them, and the backward
    pass computes ``dx`` and the factor gradients with four GEMMs and two
    batched products, instead of autograd's chain of elementwise nodes.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        l1: torch.Tensor,
        r1: torch.Tensor,
        l2: torch.Tensor,
        r2: torch.Tensor,
        scale: float,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        (n_out, rank), n_in = l1.shape, r1.shape[1]
        xc = x.reshape(-1, n_in).to(dtype)
        u = torch.empty(n_out, rank, rank, dtype=dtype, device=x.device)
        torch.mul(l1[:, :, None], l2[:, None, :], out=u)
        v = torch.empty(rank, rank, n_in, dtype=dtype, device=x.device)
        torch.mul(r1[:, None, :], r2[None, :, :], out=v)
        u2, v2 = u.view(n_out, rank * rank), v.view(rank * rank, n_in)
        mid = F.linear(xc, v2)
        ctx.save_for_backward(xc, mid, u2, v2, l1, r1, l2, r2)
        ctx.scale, ctx.x_shape, ctx.x_dtype = scale, x.shape, x.dtype  # type: ignore[attr-defined]
        return _scaled_mm(mid, u2.t(), scale).view(*x.shape[:-1], n_out)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        xc, mid, u2, v2, l1, r1, l2, r2 = ctx.saved_tensors  # type: ignore[attr-defined]
        scale: float = ctx.scale  # type: ignore[attr-defined]
        (n_out, rank), n_in = l1.shape, r1.shape[1]
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        dy2 = dy.reshape(-1, n_out).to(xc.dtype)
        dmid = _scaled_mm(dy2, u2, scale)
        dx = dl1 = dl2 = dr1 = dr2 = None
        if needs[0]:
            dx = (dmid @ v2).view(ctx.x_shape).to(ctx.x_dtype)  # type: ignore[attr-defined]
        if needs[1] or needs[3]:
            du = _scaled_mm(dy2.t(), mid, scale).view(n_out, rank, rank).to(l1.dtype)
            dl1 = torch.bmm(du, l2[:, :, None]).squeeze(2)
            dl2 = torch.bmm(du.transpose(1, 2), l1[:, :, None]).squeeze(2)
        if needs[2] or needs[4]:
            dv = (dmid.t() @ xc).view(rank, rank, n_in).to(r1.dtype)
            dr1 = (dv * r2[None, :, :]).sum(1)
            dr2 = (dv * r1[:, None, :]).sum(0)
        return dx, dl1, dr1, dl2, dr2, None, None


def factored_linear(
    x: torch.Tensor,
    l1: torch.Tensor,
    r1: torch.Tensor,
    l2: torch.Tensor,
    r2: torch.Tensor,
    row_scale: torch.Tensor | float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``x @ ΔWᵀ`` for ``ΔW = (L1·R1) ⊙ (L2·R2)`` (rows scaled by ``row_scale``) through the rank-r² factors.

    The products run in ``dtype``; the result is in ``dtype`` too. Values
    and gradients equal the dense formula's up to rounding.
    """
    if isinstance(row_scale, torch.Tensor):
        l1, row_scale = l1 * row_scale[:, None], 1.0
    return _FactoredLinear.apply(x, l1, r1, l2, r2, float(row_scale), dtype)  # type: ignore[no-any-return]
