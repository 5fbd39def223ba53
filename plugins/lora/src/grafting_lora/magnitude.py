"""DoRA's magnitude on an adapter: made from the base weight, the scale a forward applies, the merge.

One mixin for every DoRA adapter (``LoraLinear`` with ``use_dora``, ``DoraConv``,
``DoraEmbedding``); the arithmetic is :mod:`grafting_lora.reference`'s.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from grafting import MergeError
from grafting.toolkit import dense_weight, store_weight
from grafting_lora.reference import dora_merge, dora_norm, dora_scale, dora_unmerge


def wide(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32 at least: half precision is widened, float64 kept."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


class DoraMagnitude:
    """``lora_magnitude_vector`` (``m``) and ``_dora_merge_scale`` (the ``s`` a merge applied).

    The host class provides ``delta_matrix()``, the scaled ``ΔW`` as an (out, in·k) matrix;
    :meth:`norm_delta` is the ``ΔW`` the row norms add to ``W`` (the same, but for grouped
    convolutions, where PEFT's differs).
    """

    lora_magnitude_vector: nn.Parameter
    _dora_merge_scale: torch.Tensor | None = None
    delta_matrix: Callable[[], torch.Tensor]

    def norm_delta(self) -> torch.Tensor:
        """The ``ΔW`` of DoRA's row norms ``‖W + ΔW‖``, shaped like the (out, ·) weight matrix."""
        return self.delta_matrix()

    def init_magnitude(self, base_layer: nn.Module, shape: tuple[int, ...], meta: bool) -> None:
        """``m = ‖W + ΔW‖`` (the adapter starts as the base layer), in PEFT's ``shape``; empty on meta."""
        if meta:  # created for loading: the file holds the magnitude
            self.lora_magnitude_vector = nn.Parameter(torch.empty(shape, device="meta"))
            return
        with torch.no_grad():
            norm = dora_norm(wide(dense_weight(base_layer)), self.norm_delta())
        self.lora_magnitude_vector = nn.Parameter(norm.reshape(shape))

    @torch.no_grad()
    def reset_magnitude(self, weight: torch.Tensor) -> None:
        """``m = ‖W + ΔW‖`` for the dense weight ``W`` the forward will see (after an initialization)."""
        self.lora_magnitude_vector.copy_(
            dora_norm(wide(weight), self.norm_delta()).reshape_as(self.lora_magnitude_vector)
        )

    def magnitude_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """``s = m / ‖W + ΔW‖`` per output row for the dense ``weight``, in its dtype (the norm a constant)."""
        return dora_scale(self.lora_magnitude_vector, weight, self.norm_delta())

    @torch.no_grad()
    def merge_magnitude(self, base_layer: nn.Module) -> None:
        """``W ← s ⊙ (W + ΔW)``, remembering ``s`` for :meth:`unmerge_magnitude`."""
        merged, scale = dora_merge(wide(dense_weight(base_layer)), self.delta_matrix(), self.lora_magnitude_vector)
        self._dora_merge_scale = scale
        store_weight(base_layer, merged)

    @torch.no_grad()
    def unmerge_magnitude(self, base_layer: nn.Module) -> None:
        """``W ← W / s − ΔW`` with the ``s`` this process's merge applied."""
        if self._dora_merge_scale is None:
            raise MergeError("DoRA adapter was not merged by this process; cannot unmerge it")
        weight = wide(dense_weight(base_layer))
        store_weight(base_layer, dora_unmerge(weight, self.delta_matrix(), self._dora_merge_scale))
        self._dora_merge_scale = None
