"""Combining task tensors: task arithmetic, TIES, DARE, magnitude pruning, and low-rank factors by SVD.

Pure functions on tensors, for any plugin that combines adapters
(``add_weighted_adapter``). A *task tensor* is one adapter's contribution
(a factor, a ΔW, a vector); every combiner takes a list of same-shaped task
tensors and one weight each and returns one tensor of that shape.

* ``linear``: ``Σ wᵢ tᵢ`` (task arithmetic);
* ``magnitude_prune``: each ``tᵢ`` keeps only its ``density`` fraction of
  largest-magnitude entries, then the weighted sum;
* ``ties``: magnitude pruning, then per entry the sign with the larger total
  (``"total"``) or the more votes (``"frequency"``) among the unweighted
  tensors is elected; the weighted entries that agree with it are averaged;
* ``dare_linear`` / ``dare_ties``: like ``linear`` / ``ties``, but each entry
  is kept at random with probability ``density`` and the kept ones divided by
  ``density`` (the expectation is the unpruned tensor).

Random pruning draws from ``generator`` (default: torch's global generator,
so ``torch.manual_seed`` makes it repeatable).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from grafting.errors import ConfigError

MajoritySign = Literal["total", "frequency"]
MAJORITY_SIGN_METHODS: tuple[str, ...] = ("total", "frequency")


def check_density(density: object, what: str = "density") -> float:
    """``density`` as a float in [0, 1], else a :class:`ConfigError`."""
    if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0.0 <= float(density) <= 1.0:
        raise ConfigError(f"{what} must be a number in [0, 1] (the fraction of entries kept), got {density!r}")
    return float(density)


def keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """``tensor`` with all but its ``int(density · numel)`` largest-magnitude entries set to zero."""
    keep = int(check_density(density) * tensor.numel())
    if keep >= tensor.numel():
        return tensor
    flat = tensor.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.abs().topk(keep).indices] = True
    return (flat * mask).reshape(tensor.shape)


def keep_random(
    tensor: torch.Tensor, density: float, *, rescale: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Each entry kept with probability ``density`` (else zero); kept ones divided by ``density`` if ``rescale``."""
    density = check_density(density)
    if density == 1.0:
        return tensor
    if density == 0.0:
        return torch.zeros_like(tensor)
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    kept = tensor * mask
    return kept / density if rescale else kept


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """Where each task's entry has the elected sign; tasks along dim 0. Ties elect +; zeros never agree."""
    if method not in MAJORITY_SIGN_METHODS:
        raise ConfigError(f"majority_sign_method must be one of {list(MAJORITY_SIGN_METHODS)}, got {method!r}")
    signs = stacked.sign()
    strength = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)
    elected = torch.where(strength >= 0, 1.0, -1.0).to(signs.dtype)
    return signs == elected


def disjoint_mean(stacked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per entry, the mean over the tasks where ``mask`` holds (zero where none does)."""
    total = (stacked * mask).sum(dim=0)
    count = mask.sum(dim=0).clamp(min=1)
    return total / count


def _stack_weighted(tensors: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    if len(tensors) == 0:
        raise ConfigError("nothing to combine: no task tensors given")
    if len(tensors) != len(weights):
        raise ConfigError(f"{len(tensors)} task tensors but {len(weights)} weights")
    stacked = torch.stack(list(tensors))
    w = torch.as_tensor(weights, dtype=stacked.dtype, device=stacked.device)
    return stacked * w.reshape(-1, *(1,) * (stacked.dim() - 1))


def task_arithmetic(tensors: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """``Σ wᵢ tᵢ``."""
    return _stack_weighted(tensors, weights).sum(dim=0)


def magnitude_prune(
    tensors: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor, density: float
) -> torch.Tensor:
    """``Σ wᵢ · keep_largest(tᵢ, density)``."""
    return task_arithmetic([keep_largest(t, density) for t in tensors], weights)


def _elect_and_merge(
    pruned: list[torch.Tensor], weights: Sequence[float] | torch.Tensor, majority_sign_method: str
) -> torch.Tensor:
    mask = majority_sign_mask(torch.stack(pruned), majority_sign_method)
    return disjoint_mean(_stack_weighted(pruned, weights), mask)


def ties(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    density: float,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """TIES-merging: trim to the largest entries, elect a sign per entry, average the agreeing weighted entries."""
    return _elect_and_merge([keep_largest(t, density) for t in tensors], weights, majority_sign_method)


def dare_linear(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    density: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE: drop entries at random, rescale the kept ones by ``1/density``, then the weighted sum."""
    return task_arithmetic([keep_random(t, density, generator=generator) for t in tensors], weights)


def dare_ties(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    density: float,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE's random drop and rescale, then TIES' sign election and disjoint mean."""
    pruned = [keep_random(t, density, generator=generator) for t in tensors]
    return _elect_and_merge(pruned, weights, majority_sign_method)


#: The combiners by name, as ``add_weighted_adapter``'s ``combination_type`` spells them (without ``_svd``).
COMBINERS: dict[str, Callable[..., torch.Tensor]] = {
    "linear": task_arithmetic,
    "magnitude_prune": magnitude_prune,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
}
#: Combiners that prune, so they need a ``density``; those that elect signs also read ``majority_sign_method``.
NEEDS_DENSITY = frozenset({"magnitude_prune", "ties", "dare_linear", "dare_ties"})
ELECTS_SIGN = frozenset({"ties", "dare_ties"})


def combine(
    kind: str,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Combine ``tensors`` with the combiner named ``kind`` (a key of :data:`COMBINERS`)."""
    if kind not in COMBINERS:
        raise ConfigError(f"unknown combination {kind!r}; known: {sorted(COMBINERS)}")
    if kind not in NEEDS_DENSITY:
        return task_arithmetic(tensors, weights)
    if density is None:
        raise ConfigError(f"combination {kind!r} prunes the task tensors: give density (the fraction kept, in [0, 1])")
    density = check_density(density)
    if kind == "magnitude_prune":
        return magnitude_prune(tensors, weights, density)
    if kind == "ties":
        return ties(tensors, weights, density, majority_sign_method)
    if kind == "dare_linear":
        return dare_linear(tensors, weights, density, generator)
    return dare_ties(tensors, weights, density, majority_sign_method, generator)


def low_rank(
    matrix: torch.Tensor,
    rank: int,
    *,
    clamp: float | None = None,
    full_matrices: bool = True,
    driver: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` of shapes (out, rank) and (rank, in) with ``B @ A`` the best rank-``rank`` approximation of ``matrix``.

    From the SVD ``U S Vᴴ``: ``B = U[:, :rank] · S[:rank]``, ``A = Vᴴ[:rank]``;
    columns beyond the matrix's own rank are zero. ``clamp`` (a quantile in
    [0, 1]) limits the entries of both factors to ``±`` that quantile of
    their joint entries. Half-precision input is decomposed in float32;
    the factors come back in ``matrix``'s dtype. ``driver`` is passed to
    :func:`torch.linalg.svd` (CUDA only).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"the rank of the factors must be an integer > 0, got {rank!r}")
    if matrix.dim() != 2:
        raise ConfigError(f"low_rank needs a 2-d matrix, got shape {tuple(matrix.shape)}")
    work = matrix if matrix.dtype in (torch.float32, torch.float64) else matrix.float()
    u, s, vh = torch.linalg.svd(work, full_matrices=full_matrices, driver=driver)
    k = min(rank, s.shape[0])
    b = work.new_zeros(matrix.shape[0], rank)
    a = work.new_zeros(rank, matrix.shape[1])
    b[:, :k] = u[:, :k] * s[:k]
    a[:k] = vh[:k]
    if clamp is not None:
        limit = torch.quantile(torch.cat([b.reshape(-1), a.reshape(-1)]), check_density(clamp, "svd_clamp"))
        b, a = b.clamp(-limit, limit), a.clamp(-limit, limit)
    return b.to(matrix.dtype), a.to(matrix.dtype)
