"""Per-sample adapter routing: which adapter each sample of a batch goes through."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch

#: The name that routes a sample around every adapter, to the base model.
BASE = "__base__"


class Routing:
    """Sample indices grouped by adapter name, computed once per forward.

    ``single`` names the one adapter every sample of any batch goes through
    (set by :func:`route_all`); ``names`` is then empty.
    """

    def __init__(self, names: Sequence[str], single: str | None = None) -> None:
        self.single = single
        self.names = list(names)
        self.batch_size = len(self.names)
        self._groups: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            self._groups.setdefault(name, []).append(i)
        self._cache: dict[tuple[str, torch.device], torch.Tensor] = {}

    @property
    def adapter_names(self) -> list[str]:
        return [n for n in self._groups if n != BASE]

    def rows(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._cache:
            self._cache[key] = torch.tensor(self._groups[name], dtype=torch.long, device=device)
        return self._cache[key]


_current: contextvars.ContextVar[Routing | None] = contextvars.ContextVar("grafting_routing", default=None)


def current_routing() -> Routing | None:
    return _current.get()


@contextlib.contextmanager
def route_samples(names: Sequence[str]) -> Iterator[Routing]:
    """Within this block, sample ``i`` of every batch goes through adapter ``names[i]``."""
    routing = Routing(names)
    token = _current.set(routing)
    try:
        yield routing
    finally:
        _current.reset(token)


@contextlib.contextmanager
def route_all(name: str) -> Iterator[Routing]:
    """Within this block every sample of any batch goes through adapter ``name`` only.

    An adapted layer sets it while one of its adapters computes on the rows
    routed to it, so the adapted layers nested inside see those rows alone.
    """
    routing = Routing([], single=name)
    token = _current.set(routing)
    try:
        yield routing
    finally:
        _current.reset(token)
