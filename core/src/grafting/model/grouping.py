"""Shared-input grouping: the input-side products of adapted layers that read one tensor, as one matmul.

Sibling projections often read the same tensor (q/k/v of attention, gate/up of an MLP). A delta
adapter that applies a matrix ``F`` (r, in) to its layer's input first declares it
(:meth:`~grafting.protocol.DeltaAdapter.input_factor`: LoRA's ``A``). When several such adapters
act on one input, the layer called first with it (the *leader*) computes ``x·[F_1; F_2; ...]ᵀ``
once and hands each adapter its columns (a view, ``product=``); autograd then runs one matmul
for the input's gradient and one for the stacked factors' gradient.

Groups are learned, not declared: a layer called with the tensor another layer was called with
(the same object, not modified in place since) becomes that layer's follower, and from the next
call on the leader computes the followers' products too. A follower called with another tensor
computes its own, and a leader drops a follower whose product was not collected by the leader's next
call or before the input left the few remembered (:data:`CAPACITY`). Nothing else
changes: an adapter that declares no factor for a call (dropout drawn, another dtype, DoRA) and
every layer under per-sample routing, inside ``torch.compile``, inside a backward pass or under
saved-tensor hooks (activation checkpointing, whose recomputation must repeat the forward's
operations) take the per-layer path. :func:`shared_input_grouping` switches it off.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from grafting.protocol import DeltaAdapter

#: How many recent inputs are remembered (each with its uncollected products) per thread.
CAPACITY = 8


class GroupState:
    """A layer's learned followers (weak references, in the order first seen); forgotten by copies and pickles.

    It names its layer (``owner``): a shallow copy of the layer (``nn.DataParallel``'s replicas share
    their ``__dict__``) finds another owner and starts its own (:func:`state_of`).
    """

    def __init__(self, owner: Any = None) -> None:
        self.owner = None if owner is None else weakref.ref(owner)
        self.followers: list[weakref.ref] = []
        self.last: weakref.ref | None = None  # the entry of this layer's previous call as a leader

    def __reduce__(self) -> tuple[type, tuple]:
        return GroupState, ()

    def __deepcopy__(self, memo: dict) -> GroupState:
        return GroupState()

    def live_followers(self) -> list[Any]:
        """The followers still alive (the dead ones are dropped)."""
        alive = []
        for ref in self.followers:
            follower = ref()
            if follower is not None:
                alive.append(follower)
        if len(alive) != len(self.followers):
            self.followers = [weakref.ref(f) for f in alive]
        return alive

    def learn(self, layer: Any) -> None:
        ref = weakref.ref(layer)  # the one plain reference to ``layer``; equal to another only while both live
        if ref not in self.followers:
            self.followers.append(ref)

    def forget(self, layer: Any) -> None:
        self.followers = [f for f in self.followers if f() is not layer and f() is not None]


def state_of(layer: Any) -> GroupState:
    """``layer.group_state``, made anew where missing or where it is another layer's (a shallow copy's)."""
    state = layer.__dict__.get("group_state")
    if state is None or state.owner is None or state.owner() is not layer:
        state = layer.__dict__["group_state"] = GroupState(layer)
    return state


class _Entry:
    """One input tensor seen by a leader, and the products it computed for its followers (by layer id)."""

    __slots__ = ("__weakref__", "grad", "leader", "products", "tensor", "version")

    def __init__(self, tensor: torch.Tensor, version: int, leader: Any) -> None:
        self.tensor = weakref.ref(tensor)
        self.version = version
        self.grad = torch.is_grad_enabled()  # a product made without autograd is no follower's under autograd
        self.leader = weakref.ref(leader)
        self.products: dict[int, dict[str, torch.Tensor]] = {}


class _State(threading.local):
    def __init__(self) -> None:
        self.enabled = True
        self.recent: dict[int, _Entry] = {}


_state = _State()


@contextlib.contextmanager
def shared_input_grouping(enabled: bool) -> Iterator[None]:
    """Within this block (this thread), shared-input grouping is on or off (default: on).

    Off, every adapted layer computes its adapters' products on its own: the reference that the
    grouped path equals up to rounding, and the baseline of the benchmark.
    """
    previous = _state.enabled
    _state.enabled = enabled
    try:
        yield
    finally:
        _state.enabled = previous


def grouping_enabled() -> bool:
    return _state.enabled


def declares_factor(adapter: Any) -> bool:
    """Whether ``adapter``'s class can take part at all (a delta adapter overriding ``input_factor``)."""
    return isinstance(adapter, DeltaAdapter) and type(adapter).input_factor is not DeltaAdapter.input_factor


def _may_group() -> bool:
    """Whether an eager call may group now: not in a backward pass, no saved-tensor hooks."""
    if torch._C._current_graph_task_id() != -1:
        return False
    # activation checkpointing: the recomputation must save what the forward saved
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def _groupable(x: torch.Tensor) -> bool:
    """Whether ``x`` can lead a group: a floating tensor with a version counter (no inference tensor)."""
    return not (x.is_inference() or x.is_nested or not x.dtype.is_floating_point or x.ndim == 0)


def _drop_uncollected(entry: _Entry) -> None:
    """The leader forgets the followers that did not collect their products from ``entry``, which is dropped."""
    leader = entry.leader()
    if leader is not None and entry.products:
        state = state_of(leader)
        for follower in state.live_followers():
            if id(follower) in entry.products:
                state.forget(follower)
    entry.products.clear()


def _remember(x: torch.Tensor, entry: _Entry) -> None:
    recent = _state.recent
    recent.pop(id(x), None)
    recent[id(x)] = entry
    while len(recent) > CAPACITY:  # the oldest input: its followers, if any are still to come, come too late
        oldest = recent.pop(next(iter(recent)))
        if oldest.products:
            _drop_uncollected(oldest)


def _factors(x: torch.Tensor, adapters: Sequence[tuple[str, Any]]) -> list[tuple[str, torch.Tensor]]:
    """``[(name, F)]`` of the ``adapters`` that declare a factor for ``x`` (right width, same device)."""
    found = []
    for name, adapter in adapters:
        if isinstance(adapter, DeltaAdapter):
            factor = adapter.input_factor(x)
            if factor is not None and factor.shape[-1] == x.shape[-1] and factor.device == x.device:
                found.append((name, factor))
    return found


def shared_products(
    layer: Any, x: torch.Tensor, adapters: Sequence[tuple[str, Any]], members: Any
) -> dict[str, torch.Tensor]:
    """The grouped products ``x·Fᵀ`` for ``layer``'s live ``adapters`` (``{adapter name: product}``), or ``{}``.

    ``layer`` is being called with ``x``; ``members(layer)`` gives another layer's live adapters as
    ``[(name, adapter)]`` (empty when it must not group now). A follower collects what its leader
    computed for it; a leader computes its own and its followers' products when there are two or more.
    """
    if not _state.enabled or torch.compiler.is_compiling():  # a traced tensor has no identity to look up
        return {}
    entry = _state.recent.get(id(x))
    if entry is not None and (
        entry.tensor() is not x or entry.version != x._version or entry.grad != torch.is_grad_enabled()
    ):
        entry = None  # another tensor at the same address, or this one changed in place since
    if entry is not None and entry.leader() is not layer:
        return _collect(layer, x, entry, adapters)
    own = _factors(x, adapters)
    if not own or not _may_group() or not _groupable(x):
        return {}  # nothing of this layer's can group with this input (DoRA, dropout drawn, ...): no bookkeeping
    return _lead(layer, x, own, members)


def _collect(
    layer: Any, x: torch.Tensor, entry: _Entry, adapters: Sequence[tuple[str, Any]]
) -> dict[str, torch.Tensor]:
    """A follower's call: what the leader of ``entry`` computed for ``layer``'s ``adapters`` (``{}`` if nothing)."""
    mine = entry.products.get(id(layer))
    if mine is None:  # a layer the leader does not know yet: it learns it, from its next call on
        if not _factors(x, adapters) or not _may_group():
            return {}
        state_of(layer)  # a shallow copy (a DataParallel replica) gets its own state before it joins
        leader = entry.leader()
        if leader is not None:
            state_of(leader).learn(layer)
        return {}
    if not _may_group():  # inside a backward pass or under saved-tensor hooks: computed alone, as it was saved
        return {}
    del entry.products[id(layer)]
    found = {}
    for name, _ in adapters:
        if name in mine:
            found[name] = mine[name]
    return found


def _lead(layer: Any, x: torch.Tensor, own: list[tuple[str, torch.Tensor]], members: Any) -> dict[str, torch.Tensor]:
    """A leader's call: ``x``'s products for ``layer`` and its live followers, as one matmul when two or more."""
    state = state_of(layer)
    previous = None if state.last is None else state.last()
    if previous is not None and previous.products:  # followers that did not collect theirs since its last call
        _drop_uncollected(previous)
    entry = _Entry(x, x._version, layer)
    state.last = weakref.ref(entry)
    _remember(x, entry)
    if not state.followers and len(own) < 2:  # alone (so far): the entry lets a sibling find it
        return {}
    wanted = [(layer, name, factor) for name, factor in own]
    for member in state.live_followers():
        for name, factor in _factors(x, members(member)):
            wanted.append((member, name, factor))
    if len(wanted) < 2:
        return {}
    stacked = torch.cat([f for _, _, f in wanted]).to(x.dtype)
    flat = x.reshape(-1, x.shape[-1]) @ stacked.t()
    start = 0
    products = entry.products
    for member, name, factor in wanted:
        rank = factor.shape[0]
        view = flat.narrow(1, start, rank).reshape(*x.shape[:-1], rank)
        start += rank
        key = id(member)
        if key in products:
            products[key][name] = view
        else:
            products[key] = {name: view}
    return products.pop(id(layer), {})
