"""BOFT's butterfly: factors of block-diagonal rotations, each on a view that pairs the blocks it mixes.

With ``f`` factors, ``n`` inputs and blocks of ``b``, factor ``i`` (``K = 2^i``) cuts the input
into chunks of ``b·K`` and each chunk into ``2K`` half-blocks of ``h = b/2``; its block ``c`` of a
chunk holds half-blocks ``c`` and ``K + c``. Seen as an (..., chunks, 2, K, h) view, the factor
is a block product over the (2, h) axes, so no permutation matrix and no (n, n) product is formed.
This is PEFT's ``P_i · blockdiag(R_i) · P_iᵀ`` (tests compare with PEFT's matrices). The
input, a row vector, is rotated by the last factor first: ``x' = x · M_{f-1} ··· M_0``.
"""

from __future__ import annotations

import math

import torch

from grafting import ConfigError


def layout(n: int, block_size: int, block_num: int, factors: int, where: str) -> tuple[int, int]:
    """``(blocks, block size)`` for ``n`` inputs, or a ConfigError naming ``where`` (PEFT's rules)."""
    extra = factors - 1  # butterfly factors beyond the first, PEFT's (paper's) count
    if block_size == 0:
        if n % block_num:
            raise ConfigError(f"{where}: its {n} inputs are not divisible by boft_block_num {block_num}")
        if extra and (extra > int(math.log2(block_num)) or block_num % 2**extra):
            raise ConfigError(f"{where}: boft_block_num {block_num} does not allow {factors} butterfly factors")
        block_size = n // block_num
    else:
        if n % block_size:
            raise ConfigError(f"{where}: its {n} inputs are not divisible by boft_block_size {block_size}")
        if extra and n % (block_size * 2**extra):
            raise ConfigError(
                f"{where}: its {n} inputs do not hold {factors} butterfly factors of blocks of {block_size}"
            )
        block_num = n // block_size
    if extra and (block_num % 2 or block_size % 2):
        raise ConfigError(
            f"{where}: butterfly factors need an even number of blocks of even size, got {block_num} of {block_size}"
        )
    return block_num, block_size


def cayley(raw: torch.Tensor) -> torch.Tensor:
    """(..., b, b) trained matrices -> orthogonal ``(I - S)(I + S)^-1`` of their skew parts ``S``, in float32 at least."""
    wide = torch.promote_types(raw.dtype, torch.float32)
    skew = 0.5 * (raw - raw.transpose(-1, -2)).to(wide)
    eye = torch.eye(raw.shape[-1], dtype=wide, device=raw.device)
    return torch.linalg.solve(eye + skew, eye - skew, left=False).to(raw.dtype)


def apply_factor(x: torch.Tensor, blocks: torch.Tensor, index: int) -> torch.Tensor:
    """``x`` (..., n) times butterfly factor ``index`` (its (blocks, b, b) rotations) as a row vector."""
    count, size = blocks.shape[0], blocks.shape[-1]
    if index == 0:
        flat = x.reshape(-1, count, size).transpose(0, 1)
        return torch.bmm(flat, blocks).transpose(0, 1).reshape(x.shape)
    pairs, half = 2**index, size // 2
    view = x.reshape(-1, count // pairs, 2, pairs, half)
    grouped = blocks.view(count // pairs, pairs, 2, half, 2, half)
    return torch.einsum("ncakh,ckahbg->ncbkg", view, grouped).reshape(x.shape)


def rotate(x: torch.Tensor, factors: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``x · M_{f-1} ··· M_0`` for ``factors`` (f, blocks, b, b); ``transpose``: ``x · (M_{f-1} ··· M_0)ᵀ``."""
    order = range(factors.shape[0]) if transpose else reversed(range(factors.shape[0]))
    for index in order:
        blocks = factors[index].transpose(1, 2) if transpose else factors[index]
        x = apply_factor(x, blocks, index)
    return x


def dense(factors: torch.Tensor) -> torch.Tensor:
    """The (n, n) matrix ``M_{f-1} ··· M_0`` (reference path: tests compare the factored one with it)."""
    n = factors.shape[1] * factors.shape[-1]
    return rotate(torch.eye(n, dtype=factors.dtype, device=factors.device), factors)
