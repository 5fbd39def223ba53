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


def row_kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(m, p), (m, q) -> (m, p·q): row ``k`` is the Kronecker product of rows ``k`` of ``a`` and ``b``."""
    return (a[:, :, None] * b[:, None, :]).reshape(a.shape[0], -1)


def col_kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(p, n), (q, n) -> (p·q, n): column ``k`` is the Kronecker product of columns ``k`` of ``a`` and ``b``."""
    return (a[:, None, :] * b[None, :, :]).reshape(-1, a.shape[1])


def dense_delta(
    l1: torch.Tensor, r1: torch.Tensor, l2: torch.Tensor, r2: torch.Tensor, row_scale: torch.Tensor | float
) -> torch.Tensor:
    """``(L1·R1) ⊙ (L2·R2)``, rows scaled by ``row_scale`` (a number or an (out,) vector)."""
    delta = (l1 @ r1) * (l2 @ r2)
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
