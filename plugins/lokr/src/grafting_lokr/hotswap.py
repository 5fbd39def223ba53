"""LoKr's part of hot-swapping: the factored halves of ``W1 ⊗ W2`` padded with zeros to a target rank, and a
saved adapter fitted to the loaded one's layout.

Each of ``W1`` and ``W2`` is held either whole (``lokr_w1``, ``lokr_w2``) or as a low-rank product
(``lokr_w1_a·lokr_w1_b``; ``lokr_w2_a·lokr_w2_b`` or the effective convolution's core ``lokr_t2``). Zero
padding of a product's rank leaves it unchanged. A saved factored half swaps into a whole one exactly (its
product is written); a saved whole half cannot fit a loaded low-rank one and is refused. A different
``alpha/r`` is folded into ``W1`` (``ΔW`` is linear in it), so the forward's Python scaling stays. A layer the
new adapter does not cover gets zeros throughout.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from grafting import AdapterStateError
from grafting.toolkit import fit_state, grow_tensor, require_same, zeros_state
from grafting_lokr.kron import tucker_kernel


def rank_dims(adapter: Any) -> dict[str, tuple[int, ...]]:
    """The rank dimensions of the factored tensors the adapter holds: ``w1_a`` (a, r), ``w1_b`` (r, b),
    ``w2_a`` (c, r) or, effective, (r, c), ``w2_b`` (r, ...), the core ``t2`` (r, r, *kernel)."""
    dims = {
        "lokr_w1_a": (1,),
        "lokr_w1_b": (0,),
        "lokr_w2_a": (0,) if adapter.effective else (1,),
        "lokr_w2_b": (0,),
        "lokr_t2": (0, 1),
    }
    return {name: d for name, d in dims.items() if hasattr(adapter, name)}


def pad(adapter: Any, rank: int) -> None:
    """Grow every factored half to ``rank`` with zeros (whole halves have no rank); the effect is unchanged."""
    for name, dims in rank_dims(adapter).items():
        grow_tensor(adapter, name, rank, dims)
    adapter.r = rank


def _whole(tensors: dict[str, torch.Tensor], half: str, shape: torch.Size) -> torch.Tensor | None:
    """A saved half (``"w1"``/``"w2"``) as one tensor of ``shape``: whole as saved, or its factors' product."""
    whole = tensors.get(f"lokr_{half}")
    if whole is not None:
        return whole
    if f"lokr_{half}_a" not in tensors or f"lokr_{half}_b" not in tensors:
        return None
    a, b = tensors[f"lokr_{half}_a"].double(), tensors[f"lokr_{half}_b"].double()
    if f"lokr_{half.replace('w', 't')}" in tensors:
        product = tucker_kernel(tensors[f"lokr_{half.replace('w', 't')}"].double(), a, b)
    else:
        product = a @ b
    if product.numel() != math.prod(shape):
        raise AdapterStateError(
            f"the new adapter's {half.upper()} holds {tuple(product.shape)}, the loaded one's {tuple(shape)}:"
            " LoKr's Kronecker split (decompose_factor) is not a rank"
        )
    return product.reshape(shape)


def swap_values(adapter: Any, tensors: dict[str, torch.Tensor], config: Any, module_name: str) -> dict[str, Any]:
    """The loaded adapter's values for a saved LoKr adapter: same split, factored ranks <= the loaded ones."""
    require_same("rank_dropout", float(config.rank_dropout), float(adapter.rank_dropout))
    require_same("module_dropout", float(config.module_dropout), float(adapter.module_dropout))
    require_same("rank_dropout_scale", bool(config.rank_dropout_scale), bool(adapter.rank_dropout_scale))
    saved = {k: v.double() for k, v in tensors.items()}
    for half in ("w1", "w2"):
        own = getattr(adapter, f"lokr_{half}", None)
        if own is not None:  # held whole: any saved form fits, as its product
            whole = _whole(saved, half, own.shape)
            if whole is not None:
                for key in [k for k in saved if k.startswith(f"lokr_{half}") or k == f"lokr_{half.replace('w', 't')}"]:
                    del saved[key]
                saved[f"lokr_{half}"] = whole
        elif f"lokr_{half}" in saved:
            raise AdapterStateError(
                f"the new adapter holds {half.upper()} whole (lokr_{half}), the loaded one as a rank-{adapter.r}"
                " product: a whole factor does not fit a rank"
            )
    first = "lokr_w1" if hasattr(adapter, "lokr_w1") else "lokr_w1_a"
    if first in saved:
        saved[first] = saved[first] * (config.scaling_for(module_name) / adapter.scaling)
    return fit_state(
        adapter, saved, rank_dims(adapter), fixed="LoKr's Kronecker split (decompose_factor) is not a rank"
    )


def blank_values(adapter: Any) -> dict[str, torch.Tensor]:
    """Zeros for both halves, whole or factored (the core ``lokr_t2`` too): ``W1 ⊗ W2 = 0``, the layer its base.

    Zeroing one side would be enough for ``ΔW``; zeroing both leaves none of the old adapter's values behind."""
    return zeros_state(adapter)
