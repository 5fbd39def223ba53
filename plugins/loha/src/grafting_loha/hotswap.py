"""LoHa's part of hot-swapping: factors padded with zeros to a target rank, a saved adapter fitted to them.

Zero padding keeps ``ΔW = (W1a·W1b) ⊙ (W2a·W2b)``: the added columns of ``W1a`` meet the added (zero) rows
of ``W1b``, so each product, hence their Hadamard product, is unchanged; with the effective convolution the
cores ``hada_t1``/``hada_t2`` grow in both rank dimensions, likewise with zeros. A different ``alpha/r`` is
folded into ``hada_w1_a`` (``ΔW`` is linear in it), so the forward's Python scaling stays. A layer the new
adapter does not cover gets zeros throughout (``ΔW = 0``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from grafting.toolkit import fit_state, grow_tensor, require_same, zeros_state

#: The rank dimensions of each tensor: the plain factors (out, r)·(r, in·k); the effective convolution's
#: (r, out), (r, in) and the cores (r, r, *kernel).
PLAIN = {"hada_w1_a": (1,), "hada_w1_b": (0,), "hada_w2_a": (1,), "hada_w2_b": (0,)}
EFFECTIVE = {
    "hada_w1_a": (0,),
    "hada_w1_b": (0,),
    "hada_w2_a": (0,),
    "hada_w2_b": (0,),
    "hada_t1": (0, 1),
    "hada_t2": (0, 1),
}


def rank_dims(adapter: Any) -> dict[str, tuple[int, ...]]:
    return EFFECTIVE if adapter.effective else PLAIN


def pad(adapter: Any, rank: int) -> None:
    """Grow every factor (and core) to ``rank`` with zeros; the adapter computes as before."""
    for name, dims in rank_dims(adapter).items():
        grow_tensor(adapter, name, rank, dims)
    adapter.r = rank


def swap_values(adapter: Any, tensors: dict[str, torch.Tensor], config: Any, module_name: str) -> dict[str, Any]:
    """The loaded adapter's values for a saved LoHa adapter of rank <= its own, any alpha."""
    require_same("rank_dropout", float(config.rank_dropout), float(adapter.rank_dropout))
    require_same("module_dropout", float(config.module_dropout), float(adapter.module_dropout))
    kernel = getattr(adapter, "kernel", ())
    effective = bool(config.use_effective_conv2d) and math.prod(kernel) > 1
    require_same("use_effective_conv2d (on this layer)", effective, adapter.effective)
    ratio = config.scaling_for(module_name) / adapter.scaling
    scaled = {k: v.double() * ratio if k == "hada_w1_a" else v for k, v in tensors.items()}
    return fit_state(adapter, scaled, rank_dims(adapter))


def blank_values(adapter: Any) -> dict[str, torch.Tensor]:
    """Zeros for every factor (and core): both products are zero, so is their Hadamard product ``ΔW``, and the
    layer computes its base layer's output (the dense, the factored and the convolution paths alike)."""
    return zeros_state(adapter)
