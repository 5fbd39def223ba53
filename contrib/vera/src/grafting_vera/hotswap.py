"""VeRA's part of hot-swapping. The rank is the shared projections' (``vera_A`` r × in, ``vera_B`` out × r) and
each layer's ``vera_lambda_d`` (r): padded with zeros, ``λ_b ⊙ B (λ_d ⊙ A x)`` is unchanged. A saved adapter's
projections come from its file (``save_projection``) or are drawn again from its ``projection_prng_key``."""

from __future__ import annotations

from typing import Any

import torch

from grafting.toolkit import fit, fit_state, grow_tensor, require_same, zeros_state

LAYER_RANK_DIMS = {"vera_lambda_d": (0,)}
SHARED_RANK_DIMS = {"vera_A": (0,), "vera_B": (1,)}


def pad_layer(adapter: Any, rank: int) -> None:
    grow_tensor(adapter, "vera_lambda_d", rank, (0,))


def pad_shared(shared: Any, rank: int) -> None:
    for name, dims in SHARED_RANK_DIMS.items():
        grow_tensor(shared, name, rank, dims)


def swap_layer(adapter: Any, tensors: dict[str, torch.Tensor], config: Any) -> dict[str, Any]:
    """A layer's λ vectors from a saved VeRA adapter of rank <= the loaded (padded) one."""
    require_same("vera_dropout", float(config.vera_dropout), float(getattr(adapter.vera_dropout, "p", 0.0)))
    return fit_state(adapter, tensors, LAYER_RANK_DIMS)


def blank_layer(adapter: Any) -> dict[str, torch.Tensor]:
    """``λ_b`` and ``λ_d`` zero: the layer's delta is zero whatever the shared projections hold (they stay as the
    new adapter gives them, for the layers it covers)."""
    return zeros_state(adapter)


def swap_shared(shared: Any, tensors: dict[str, torch.Tensor], config: Any, draw: Any) -> dict[str, Any]:
    """The projections of a saved VeRA adapter (from the file, or drawn by ``draw(r, n_in, n_out, key)``), fitted."""
    n_in, n_out = shared.vera_A.shape[1], shared.vera_B.shape[0]
    if "vera_A" in tensors and "vera_B" in tensors:
        a, b = tensors["vera_A"], tensors["vera_B"]
    else:
        a, b = draw(config.r, n_in, n_out, config.projection_prng_key)
    return {
        name: fit(value, getattr(shared, name).shape, name, SHARED_RANK_DIMS[name])
        for name, value in (("vera_A", a), ("vera_B", b))
    }
