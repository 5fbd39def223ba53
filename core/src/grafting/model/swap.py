"""Tensor helpers for a layer adapter's hot-swap methods (``pad_rank``, ``hotswap_values``, ``hotswap_blank_values``).

A method names the rank dimensions of its tensors (``{"lora_A.weight": (0,), "lora_B.weight": (1,)}``); these
helpers grow a parameter or buffer along them with zeros, give a saved tensor the loaded one's shape (zeros in the rank
dimensions beyond the saved rank) and refuse, with one clear :class:`AdapterStateError`, a tensor whose other
dimensions differ (a block size, another layer's width) or whose rank exceeds the loaded one's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from grafting.errors import AdapterStateError

#: Per state_dict key, the dimensions that hold the rank (missing: no rank dimension).
RankDims = Mapping[str, Sequence[int]]


def require_same(what: str, new: Any, loaded: Any) -> None:
    """Refuse a swap whose ``what`` (an option the forward reads as a Python value) differs from the loaded one's."""
    if new != loaded:
        raise AdapterStateError(
            f"the new adapter's {what} is {new!r}, the loaded one's {loaded!r}: hot-swapping keeps the structure"
        )


@torch.no_grad()
def grow_tensor(owner: nn.Module, name: str, rank: int, dims: Sequence[int]) -> None:
    """Replace ``owner.<name>`` (a parameter or a buffer) by a copy whose ``dims`` have size ``rank``, the new
    entries zero; a buffer stays a buffer (persistent or not), a parameter keeps ``requires_grad``.

    Before ``torch.compile`` only (a new tensor); a smaller ``rank`` than the current is refused.
    """
    old = getattr(owner, name)
    current = {old.shape[d] for d in dims}
    if any(rank < size for size in current):
        raise AdapterStateError(f"{name} of rank {max(current)} cannot shrink to target_rank={rank}")
    if current == {rank}:
        return
    shape = list(old.shape)
    for d in dims:
        shape[d] = rank
    grown = old.new_zeros(shape)
    grown[tuple(slice(0, n) for n in old.shape)] = old
    if name in owner._buffers:
        owner.register_buffer(name, grown, persistent=name not in owner._non_persistent_buffers_set)
    else:
        setattr(owner, name, nn.Parameter(grown, requires_grad=old.requires_grad))


def fit(
    value: torch.Tensor,
    shape: torch.Size | Sequence[int],
    key: str,
    dims: Sequence[int] = (),
    fixed: str = "only a rank can differ in a hot-swap",
) -> torch.Tensor:
    """``value`` in float64 with ``shape``: equal except in ``dims``, where it is zero-padded up to ``shape``.

    ``fixed`` says why the other dimensions cannot differ (OFT: its block size is not a rank).
    """
    if value.dim() != len(shape) or any(
        n != m for d, (n, m) in enumerate(zip(value.shape, shape, strict=True)) if d not in dims
    ):
        raise AdapterStateError(
            f"the new adapter's {key} has shape {tuple(value.shape)}, the loaded one's {tuple(shape)}: {fixed}"
        )
    if any(value.shape[d] > shape[d] for d in dims):
        raise AdapterStateError(
            f"the new adapter's rank {max(value.shape[d] for d in dims)} ({key}) exceeds the loaded one's"
            f" {max(shape[d] for d in dims)}: call prepare_model_for_compiled_hotswap(model, target_rank=...)"
            " before compiling"
        )
    out = torch.zeros(tuple(shape), dtype=torch.float64, device=value.device)
    out[tuple(slice(0, n) for n in value.shape)] = value.double()
    return out


def fit_state(
    adapter: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    rank_dims: RankDims | None = None,
    fixed: str = "only a rank can differ in a hot-swap",
) -> dict[str, torch.Tensor]:
    """The saved ``tensors`` for every entry of ``adapter.state_dict()``, each fitted to its shape (:func:`fit`).

    A key of either side that the other lacks is refused: the saved adapter is built otherwise.
    """
    own = adapter.state_dict()
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or extra:
        raise AdapterStateError(
            "the new adapter is built otherwise here: "
            + "; ".join(
                part
                for part in (
                    f"it lacks {', '.join(missing)}" if missing else "",
                    f"it holds {', '.join(extra)}, which the loaded one has not" if extra else "",
                )
                if part
            )
        )
    dims = rank_dims or {}
    return {key: fit(tensors[key], own[key].shape, key, dims.get(key, ()), fixed) for key in own}


def zeros_state(adapter: nn.Module) -> dict[str, torch.Tensor]:
    """Zeros for every entry of ``adapter.state_dict()``, in its shapes and dtypes: the ``hotswap_blank_values`` of a
    method whose effect is zero when all its tensors are (LoRA's, LoHa's and LoKr's factors, OFT's skew blocks)."""
    return {key: torch.zeros_like(tensor.detach()) for key, tensor in adapter.state_dict(keep_vars=True).items()}


__all__ = ["RankDims", "fit", "fit_state", "grow_tensor", "require_same", "zeros_state"]
