"""What adapters on an output head tied to the input embedding share: they follow the embedding's adapter."""

from __future__ import annotations

from typing import ClassVar, Generic, TypeVar

import torch
from torch import nn

from grafting import DeltaAdapter, MergeError

Leader = TypeVar("Leader", bound=nn.Module)


class TiedFollower(DeltaAdapter, Generic[Leader]):
    """A delta adapter on a layer whose weight is an embedding's, reading that embedding's adapter.

    The embedding's adapter is held by reference (a tuple: not registered, not saved twice).
    A merge into the one shared weight is the embedding adapter's; this one's merge and unmerge
    only check that the weight is still shared.
    """

    #: the end of the error raised once the weight is no longer shared: what the layer follows, what to do
    untied: ClassVar[str]

    def __init__(self, leader: Leader, shared_weight: torch.Tensor) -> None:
        super().__init__()
        self._tied = (leader, shared_weight)

    @property
    def tied_to(self) -> Leader:
        return self._tied[0]

    def check_merge(self, base_layer: nn.Module) -> None:
        if getattr(base_layer, "weight", None) is not self._tied[1]:
            raise MergeError(f"{type(base_layer).__name__} no longer shares its weight with {self.untied}")

    def merge(self, base_layer: nn.Module) -> None:
        self.check_merge(base_layer)  # the embedding adapter's merge changes the shared weight once

    def unmerge(self, base_layer: nn.Module) -> None:
        self.check_merge(base_layer)
