"""AdaLoRA's part of hot-swapping: ``A`` (r, in·k), ``E`` (r, 1) and ``B`` (out, r) padded with zeros to a target
rank (a zero singular value adds nothing to ``B·(A ⊙ E)``), a saved adapter of up to that rank fitted to them.

The scale ``lora_alpha / (ranknum + 1e-5)`` the forward reads stays; a saved adapter's other scale (another
``lora_alpha`` or ``init_r``) is folded into ``B``. The rank allocator's shared state holds no tensors. A layer
the new adapter does not cover gets zeros.
"""

from __future__ import annotations

from typing import Any

import torch

from grafting.toolkit import fit_state, grow_tensor, require_same, zeros_state

RANK_DIMS = {"lora_A": (0,), "lora_E": (0,), "lora_B": (1,)}


def pad(adapter: Any, rank: int) -> None:
    """Grow ``A``, ``E`` and ``B`` to ``rank`` with zeros; the adapter computes as before."""
    for name, dims in RANK_DIMS.items():
        grow_tensor(adapter, name, rank, dims)


def swap_values(adapter: Any, tensors: dict[str, torch.Tensor], config: Any) -> dict[str, Any]:
    """The loaded adapter's values for a saved AdaLoRA adapter of rank <= its own, any alpha and ``init_r``."""
    require_same("lora_dropout", float(config.lora_dropout), float(getattr(adapter.dropout, "p", 0.0)))
    new_scale = float(config.lora_alpha) / (float(config.init_r) + 1e-5)
    ratio = new_scale / float(adapter.scale().double().item())
    scaled = {k: v.double() * ratio if k == "lora_B" else v for k, v in tensors.items()}
    return fit_state(adapter, scaled, RANK_DIMS)


def blank_values(adapter: Any) -> dict[str, torch.Tensor]:
    """Zeros for ``A``, ``E`` and ``B``: ``B·(A ⊙ E) = 0``, the layer its base (``ranknum`` is no saved entry)."""
    return zeros_state(adapter)
