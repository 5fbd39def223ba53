"""The block rotations of OFT: skew-symmetric blocks, their Cayley transform, applying them.

A layer's ``n`` inputs are cut into ``r`` blocks of ``b``. Block ``i`` holds a skew-symmetric
``Q_i`` (its strict upper triangle is the trained vector, row by row) and the orthogonal
``R_i = (I - Q_i)(I + Q_i)^-1`` (exact Cayley), or PEFT's truncated series
``I + 2Q + 2Q² + ... + Q^m`` (``use_cayley_neumann``). The input is rotated as a row vector,
block by block: ``x'_i = x_i · R_i``; so a linear layer computes ``W·x' = W'·x`` with
``W' = W·diag(R_i)ᵀ``, which is what a merge writes.
"""

from __future__ import annotations

import warnings

import torch

from grafting import GraftingWarning


def nearest_divisor(n: int, wanted: int) -> int:
    """The divisor of ``n`` nearest to ``wanted`` (ties go down; ``n`` itself for ``wanted >= n``), as PEFT picks it."""
    if wanted >= n:
        return n
    lower = next(d for d in range(wanted, 0, -1) if n % d == 0)
    higher = next(d for d in range(wanted, n + 1) if n % d == 0)
    return lower if wanted - lower <= higher - wanted else higher


def block_layout(n: int, r: int, block_size: int, where: str) -> tuple[int, int]:
    """``(blocks, block size)`` for ``n`` inputs from one of ``r``/``block_size`` (the other 0), as PEFT adjusts them."""
    if r == 0:
        size = nearest_divisor(n, block_size)
        if size != block_size:
            warnings.warn(
                f"{where}: oft_block_size {block_size} does not divide its {n} inputs; using {size}",
                GraftingWarning,
                stacklevel=3,
            )
        return n // size, size
    blocks = nearest_divisor(n, r)
    if blocks != r:
        warnings.warn(f"{where}: r {r} does not divide its {n} inputs; using {blocks}", GraftingWarning, stacklevel=3)
    return blocks, n // blocks


def skew(vec: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, size: int) -> torch.Tensor:
    """(k, b(b-1)/2) upper triangles -> (k, b, b) skew-symmetric matrices."""
    upper = vec.new_zeros(vec.shape[0], size, size)
    upper[:, rows, cols] = vec
    return upper - upper.transpose(1, 2)


def cayley(q: torch.Tensor, neumann_terms: int | None) -> torch.Tensor:
    """The orthogonal blocks of skew ``q``: exact (``None``, computed in float32 at least) or PEFT's series."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    if neumann_terms is None:
        wide = torch.promote_types(q.dtype, torch.float32)
        eye_w, q_w = eye.to(wide), q.to(wide)
        return torch.linalg.solve(eye_w + q_w, eye_w - q_w, left=False).to(q.dtype)
    if neumann_terms == 1:
        return eye.expand_as(q).clone()
    if neumann_terms == 2:
        return eye + 2 * q
    top = max(3, neumann_terms - 1)  # PEFT: I + 2(Q + ... + Q^(top-1)) + Q^top
    total, power = eye + 2 * q, q
    for _ in range(2, top):
        power = torch.bmm(power, q)
        total = total + 2 * power
    return total + torch.bmm(power, q)


def constrain(vec: torch.Tensor, eps: float, size: int) -> torch.Tensor:
    """COFT: each block's skew matrix scaled back to Frobenius norm ``eps / √k`` when it is larger."""
    limit = (eps / torch.tensor(float(vec.shape[0])).sqrt()).item()  # PEFT's bound, rounded to float32 as there
    norm = vec.norm(dim=1, keepdim=True) * 2**0.5  # both triangles of the skew matrix
    return torch.where(norm <= limit, vec, vec * (limit / norm))


def rotate(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x`` (..., k·b) rotated block by block, ``x_i · R_i``; one (b, b) block is shared by all when ``k`` is 1."""
    count, size = blocks.shape[0], blocks.shape[-1]
    if count == 1:
        return (x.reshape(-1, size) @ blocks[0]).reshape(x.shape)
    flat = x.reshape(-1, count, size).transpose(0, 1)
    return torch.bmm(flat, blocks).transpose(0, 1).reshape(x.shape)


def dense(blocks: torch.Tensor, count: int) -> torch.Tensor:
    """The (n, n) block-diagonal matrix of ``blocks`` (one block repeated ``count`` times if shared): the reference path."""
    parts = list(blocks) if blocks.shape[0] == count else [blocks[0]] * count
    return torch.block_diag(*parts)
