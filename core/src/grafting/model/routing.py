"""Per-sample adapter routing: which adapter each sample of a batch goes through."""

from __future__ import annotations

import contextlib
import threading
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
        self._index: dict[tuple[tuple[str, ...], torch.device], torch.Tensor] = {}
        #: the adapters the batch routes to, in order of first sample (read by every adapted layer: listed once)
        self.adapter_names: tuple[str, ...] = tuple(n for n in self._groups if n != BASE)

    def index(self, group: tuple[str, ...], device: torch.device) -> torch.Tensor:
        """For each sample, the position of its adapter in ``group``, or -1 (another adapter, the base)."""
        key = (group, device)
        if key not in self._index:
            position = {name: k for k, name in enumerate(group)}
            self._index[key] = torch.tensor([position.get(n, -1) for n in self.names], dtype=torch.long, device=device)
        return self._index[key]

    def rows(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._cache:
            self._cache[key] = torch.tensor(self._groups[name], dtype=torch.long, device=device)
        return self._cache[key]


class _State(threading.local):
    """The routing in force, per thread.

    A thread-local, not a ``ContextVar``: ``torch.compile`` traces reads of a
    thread-local attribute (and guards on it), while ``ContextVar.get`` breaks
    the graph in every adapted layer.
    """

    def __init__(self) -> None:  # runs once in each thread: the attribute always exists there
        self.routing: Routing | None = None


_state = _State()


def current_routing() -> Routing | None:
    return _state.routing


@contextlib.contextmanager
def _routed(routing: Routing) -> Iterator[Routing]:
    previous = _state.routing
    _state.routing = routing
    try:
        yield routing
    finally:
        _state.routing = previous


@contextlib.contextmanager
def route_samples(names: Sequence[str]) -> Iterator[Routing]:
    """Within this block, sample ``i`` of every batch goes through adapter ``names[i]``."""
    with _routed(Routing(names)) as routing:
        yield routing


@contextlib.contextmanager
def route_all(name: str) -> Iterator[Routing]:
    """Within this block every sample of any batch goes through adapter ``name`` only.

    An adapted layer sets it while one of its adapters computes on the rows
    routed to it, so the adapted layers nested inside see those rows alone.
    """
    with _routed(Routing([], single=name)) as routing:
        yield routing
