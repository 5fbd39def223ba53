"""AdaptedLayer: the wrapper that holds a frozen base layer and composes its adapters by site.

The adapter classes it composes are the protocol's (:mod:`grafting.protocol`,
re-exported here); ARCHITECTURE.md, section 3, gives the algebra.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch import nn

from grafting.errors import AdapterNotFoundError, AdapterStateError, MergeError
from grafting.model.attribute_view import attribute_view
from grafting.model.grouping import GroupState, declares_factor, shared_products
from grafting.model.routing import current_routing, route_all
from grafting.protocol import (
    DeltaAdapter,
    InputAdapter,
    LayerAdapter,
    LayerCall,
    OutputAdapter,
    Site,
    WeightAdapter,
)

__all__ = [
    "AdaptedLayer",
    "DeltaAdapter",
    "InputAdapter",
    "LayerAdapter",
    "LayerCall",
    "OutputAdapter",
    "Site",
    "WeightAdapter",
]


#: The attributes whose assignment changes which adapters act (:meth:`AdaptedLayer._relive`).
_LIVE_FIELDS = frozenset({"active", "merged"})


def _primary(args: tuple, kwargs: dict) -> tuple[Any, str | int]:
    if args:
        return args[0], 0
    for key in ("hidden_states", "input", "x", "input_ids"):
        if key in kwargs:
            return kwargs[key], key
    raise TypeError("AdaptedLayer needs the layer's input as first argument or as hidden_states=")


def _replace(args: tuple, kwargs: dict, where: str | int, value: Any) -> tuple[tuple, dict]:
    if where == 0:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, str(where): value}


class AdaptedLayer(nn.Module):
    """A frozen ``base_layer`` plus adapters, composed by site.

    ``active`` lists the adapters that act in forward; ``merged`` the ones
    folded into the base weights, in merge order.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        #: merge order; assign a new list to change it (the live adapters follow assignments)
        self.merged: list[str] = []
        self.disabled = False
        #: the layers learned to read this layer's input after it (shared-input grouping)
        self.group_state = GroupState(self)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in _LIVE_FIELDS:
            self._relive()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._relive()

    def _relive(self) -> None:
        """Recompute what every forward would otherwise derive from ``active``, ``merged`` and the adapters.

        ``_live``: the names acting in an unrouted forward (active, unmerged, held), in ``active``'s
        order; ``_groupable``: whether one of them declares an input factor (shared-input grouping).
        Names, not adapters: a ``DataParallel`` replica shares this ``__dict__`` but holds its own
        adapters. Called on every assignment of ``active`` or ``merged`` and on
        :meth:`add_adapter`/:meth:`remove_adapter`, the only ways these change.
        """
        held = self.__dict__
        adapters = self._modules.get("adapters")
        if adapters is None or "merged" not in held or "active" not in held:
            return  # still in __init__
        modules = adapters._modules
        live = tuple(n for n in held["active"] if n in modules and n not in held["merged"])
        held["_live"] = live
        held["_groupable"] = any(declares_factor(modules[n]) for n in live)

    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapper lacks (``weight``, ``in_features``, ...) are the base layer's.

        Model code reads them on the modules it calls (T5's ``self.wo.weight.dtype``). Before
        them come the PEFT attributes the adapters declare (``lora_A``, ``ia3_l``, ...): a
        read-only view ``{adapter name: value}`` over the adapters themselves.
        """
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "adapters"):
                raise
            adapters = self._modules.get("adapters")
            view = None if adapters is None else attribute_view(cast(nn.ModuleDict, adapters), name)
            if view is not None:  # PEFT's layer.lora_A["default"] and the like
                return view
            return getattr(self.base_layer, name)

    # -- bookkeeping --------------------------------------------------------------
    def add_adapter(self, name: str, adapter: LayerAdapter) -> None:
        if name in self.adapters:
            raise AdapterStateError(f"layer already holds an adapter named {name!r}")
        self.adapters[name] = adapter
        self._relive()

    def remove_adapter(self, name: str) -> None:
        if name in self.merged:
            self.unmerge([name])
        del self.adapters[name]
        self.active = tuple(n for n in self.active if n != name)  # assigning it recomputes the live adapters

    def set_active(self, names: list[str] | tuple[str, ...]) -> None:
        self.active = tuple(n for n in names if n in self.adapters)

    def _sorted(self, names: list[str] | set[str]) -> list[str]:
        """Adapter names in merge order: by site, one that reads the base weight first, then insertion order.

        Input adapters merge in reverse insertion order: the forward applies them in insertion order, so
        the last one added acts next to the weight and is folded into it first (``W' = W·M_k···M_1``).
        """
        order = list(self.adapters.keys())

        def key(name: str) -> tuple[int, bool, int]:
            adapter, index = self._get(name), order.index(name)
            return adapter.site, not adapter.reads_base_weight, -index if adapter.site is Site.INPUT else index

        return sorted(names, key=key)

    # -- forward ------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # the module dicts, read directly (nn.Module.__getattr__ is a Python call, twice through this class's)
        base: nn.Module = self._modules["base_layer"]  # type: ignore[assignment]
        if self.disabled:
            return base(*args, **kwargs)
        routing = current_routing()
        if routing is None:
            return self._compose(self._live, self._groupable, args, kwargs)
        if routing.single is None:
            return self._routed_forward(routing, args, kwargs)
        # inside an adapter's computation on its own rows: that adapter alone
        if self.merged:
            raise AdapterStateError("per-sample adapters need unmerged adapters; call unmerge_adapter() first")
        single = routing.single
        return self._compose((single,) if single in self._held() else (), False, args, kwargs)

    def _compose(self, names: tuple[str, ...], group: bool, args: tuple, kwargs: dict) -> Any:
        """The base layer's call with the unmerged adapters ``names`` (``group``: shared-input grouping may apply)."""
        base: nn.Module = self._modules["base_layer"]  # type: ignore[assignment]
        if not names:
            return base(*args, **kwargs)
        held = self._held()
        pairs = [(name, held[name]) for name in names]
        x = args[0] if args else _primary(args, kwargs)[0]
        products: dict[str, torch.Tensor] = {}
        if group and isinstance(x, torch.Tensor):
            products = shared_products(self, x, pairs, AdaptedLayer.live_adapters)
        if len(pairs) == 1 and len(args) == 1 and not kwargs:
            name, adapter = pairs[0]  # a product is passed only to an adapter that declared a factor
            fused = adapter.fused_call(base, x, products[name]) if products else adapter.fused_call(base, x)
            if fused is not None:
                return fused
        return self._composition(pairs, products, args, kwargs)

    def _composition(
        self, pairs: list[tuple[str, LayerAdapter]], products: dict[str, torch.Tensor], args: tuple, kwargs: dict
    ) -> Any:
        """Input adapters, the base layer with the weight adapters, deltas, output adapters: the general path."""
        base = self.base_layer
        x, where = _primary(args, kwargs)
        live = [a for _, a in pairs]
        by_adapter = {id(adapter): products[name] for name, adapter in pairs if name in products}
        live.sort(key=lambda a: a.site)
        base_args, base_kwargs = args, kwargs
        x_in = x
        inputs = [cast(InputAdapter, a) for a in self.adapters.values() if a in live and a.site is Site.INPUT]
        for step in inputs:  # insertion order: the reverse of their merge order
            x_in = step(x_in)
        if x_in is not x:
            base_args, base_kwargs = _replace(args, kwargs, where, x_in)
        out = self._call_base([a for a in live if a.site is Site.WEIGHT], base_args, base_kwargs)
        y = out[0] if isinstance(out, tuple) else out
        for step in inputs:
            y = step.after_base(y, base)
        dtype = y.dtype
        call: LayerCall | None = None
        for adapter in live:
            if adapter.site is Site.DELTA:
                if call is None:
                    call = LayerCall(base, args, kwargs, y)
                product = by_adapter.get(id(adapter))
                if product is None:
                    y = cast(DeltaAdapter, adapter).add_delta(y, x, call)
                else:
                    y = cast(DeltaAdapter, adapter).add_delta(y, x, call, product)
            elif adapter.site is Site.OUTPUT:
                y = adapter(y)
        y = y.to(dtype)  # a delta may come in its adapter's wider dtype: the sum is rounded once, as in PEFT
        return (y, *out[1:]) if isinstance(out, tuple) else y

    def live_adapters(self) -> list[tuple[str, LayerAdapter]]:
        """``[(name, adapter)]`` acting in an unrouted forward now: active, unmerged, the layer enabled."""
        if self.disabled:
            return []
        held = self._held()
        return [(n, held[n]) for n in self._live]

    def _held(self) -> dict[str, LayerAdapter]:
        """The adapters by name: ``self.adapters``' own dict."""
        return self._modules["adapters"]._modules  # type: ignore[union-attr,return-value]

    def _call_base(self, weight_adapters: list[LayerAdapter], args: tuple, kwargs: dict) -> Any:
        """The base layer's call, with ``W + Σ ΔW`` in place of the parameters weight adapters change."""
        if not weight_adapters:
            return self.base_layer(*args, **kwargs)
        params: dict[str, torch.Tensor] = {}
        for adapter in weight_adapters:
            params.update(cast(WeightAdapter, adapter).call_weights(self.base_layer, params))
        return torch.func.functional_call(self.base_layer, params, args, kwargs, strict=False)

    def _routed_forward(self, routing: Any, args: tuple, kwargs: dict) -> Any:
        if self.merged:
            raise AdapterStateError("per-sample adapters need unmerged adapters; call unmerge_adapter() first")
        own = self._held()  # each routed adapter of this layer looked up once
        present = {n: own[n] for n in routing.adapter_names if n in own}
        for name, adapter in present.items():
            if adapter.site is Site.WEIGHT:
                raise AdapterStateError(
                    f"adapter {name!r} ({type(adapter).__name__}) changes the layer's weights; per-sample"
                    " adapter_names cannot route it (PEFT refuses it too)"
                )
        x, where = _primary(args, kwargs)
        if x.shape[0] != routing.batch_size:
            raise AdapterStateError(
                f"adapter_names has {routing.batch_size} entries but the batch has {x.shape[0]} samples"
            )
        pending = list(present)
        groups = self._groups(pending, present)
        if len(args) == 1 and not kwargs and len(groups) == 1 and len(groups[0]) == len(pending):
            adapters = [cast(DeltaAdapter, present[n]) for n in groups[0]]
            index = routing.index(groups[0], x.device)
            fused = type(adapters[0]).grouped_call(adapters, self.base_layer, x, index)
            if fused is not None:  # the base layer and every routed delta in one step
                return fused
        out = self.base_layer(*args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out
        result = y
        for group in groups:
            adapters = [cast(DeltaAdapter, present[n]) for n in group]
            index = routing.index(group, y.device)
            value = type(adapters[0]).add_grouped(
                adapters, result, x, index, LayerCall(self.base_layer, args, kwargs, y)
            )
            if value is not None:
                result = value.to(y.dtype)
                pending = [n for n in pending if n not in group]
        for name in pending:
            adapter = present[name]
            rows = routing.rows(name, y.device)
            with route_all(name):  # adapted layers nested in this one see these rows, routed to `name`
                if adapter.site is Site.INPUT:
                    sub_args, sub_kwargs = _replace(args, kwargs, where, adapter(x[rows]))
                    sub = self.base_layer(*sub_args, **sub_kwargs)
                    value = cast(InputAdapter, adapter).after_base(
                        sub[0] if isinstance(sub, tuple) else sub, self.base_layer
                    )
                elif adapter.site is Site.DELTA:
                    own = y[rows]
                    call = LayerCall(self.base_layer, args, kwargs, own, rows)
                    value = cast(DeltaAdapter, adapter).add_delta(own, x[rows], call)
                else:
                    value = adapter(y[rows])
            if result is y:
                result = y.clone()
            result = result.index_copy(0, rows, value.to(result.dtype))
        return (result, *out[1:]) if isinstance(out, tuple) else result

    @staticmethod
    def _groups(names: list[str], adapters: dict[str, LayerAdapter]) -> list[tuple[str, ...]]:
        """Routed delta adapters by class, for :meth:`DeltaAdapter.add_grouped`."""
        groups: dict[type, list[str]] = {}
        for name in names:
            adapter = adapters[name]
            if adapter.site is Site.DELTA:
                groups.setdefault(type(adapter), []).append(name)
        return [tuple(group) for group in groups.values()]

    # -- merging ------------------------------------------------------------------
    def merge(self, names: list[str], *, safe: bool = False, layer_name: str = "layer") -> None:
        """Fold ``names`` into the base weights, keeping the forward unchanged.

        Raises :class:`MergeError` and leaves the weights as they were if the
        merged set would not be a prefix of the site order, or (``safe``) if
        the merged weights are not finite.
        """
        names = [n for n in names if n in self.adapters]
        self.rebuild(set(self.merged) | set(names), safe=safe, layer_name=layer_name)

    def unmerge(self, names: list[str] | None = None, *, layer_name: str = "layer") -> None:
        """Take ``names`` (default: all) out of the base weights."""
        drop = set(self.merged) if names is None else set(names)
        self.rebuild(set(self.merged) - drop, safe=False, layer_name=layer_name)

    def check_merge(self, names: list[str], *, safe: bool = False, layer_name: str = "layer") -> None:
        """Raise :class:`MergeError` if :meth:`merge` of ``names`` would be refused; touches no weight.

        With ``safe`` it also merges into a copy of this layer and refuses non-finite weights, so
        a model-wide safe merge can refuse before any layer's weights change.
        """
        target = set(self.merged) | {n for n in names if n in self.adapters}
        self.check_rebuild(target, safe=safe, layer_name=layer_name)

    def check_rebuild(
        self, target: set[str], *, safe: bool = False, layer_name: str = "layer", without: str | None = None
    ) -> None:
        """Raise :class:`MergeError` if bringing the merged set to ``target`` would be refused; touches no weight.

        The order checks come first; then, when adapters must come out of the weights (a method may refuse
        to unmerge, as IA3 does near zero) or ``safe`` asks for finite weights, the change is tried on a copy
        of this layer. ``without`` leaves an adapter out of the active set (one about to be deleted).
        """
        if target == set(self.merged):
            return
        trial: AdaptedLayer = self
        if without is not None:
            trial = copy.deepcopy(self)
            trial.active = tuple(n for n in trial.active if n != without)
        trial._check(target, layer_name)
        if safe or self.merged:
            if trial is self:
                trial = copy.deepcopy(self)
            trial.rebuild(target, safe=safe, layer_name=layer_name)

    def _check(self, target: set[str], layer_name: str) -> None:
        for name in target:
            if not self._get(name).mergeable:
                raise MergeError(f"{layer_name}: adapter {name!r} ({type(self._get(name)).__name__}) cannot be merged")
        for name in sorted(target - set(self.merged)):
            try:
                self._get(name).check_merge(self.base_layer)
            except MergeError as error:
                raise MergeError(f"{layer_name}: adapter {name!r}: {error}") from error
        readers = sorted(n for n in target if self._get(n).reads_base_weight)
        if readers:
            clash = [n for n in sorted(target) if n != readers[0] and (n in readers or self._get(n).site is Site.INPUT)]
            if clash:
                raise MergeError(
                    f"{layer_name}: adapter {readers[0]!r} merges from the layer's own weight and cannot be merged"
                    f" together with {clash} (another such adapter or an input adapter); merge fewer adapters"
                )
        if target:
            waiting = sorted(n for n in set(self.active) - target if self._get(n).reads_base_weight)
            if waiting:  # PEFT merges anyway and the output changes
                raise MergeError(
                    f"{layer_name}: cannot merge {sorted(target)} while active adapter {waiting[0]!r} stays unmerged:"
                    " it reads the layer's own weight (DoRA's norm), which the merge would change; merge it too,"
                    " or deactivate it first"
                )
            self._check_input_order(target, layer_name)
            top = max(self._get(n).site for n in target)
            for name in set(self.active) - target:
                if self._get(name).site < top:
                    raise MergeError(
                        f"{layer_name}: cannot merge {sorted(target)} while active adapter {name!r} "
                        f"({self._get(name).site.name} site) stays unmerged; merge it too"
                    )

    def record_merged(self) -> None:
        """Remember what the merged weights look like (after a model-wide merge: tied layers share weights)."""
        self._merged_fingerprint = _fingerprint(self.base_layer) if self.merged else None

    def check_unchanged(self, layer_name: str = "layer") -> None:
        """MergeError when the base weights were edited in place since :meth:`record_merged`: unmerging
        could not give the original weights back then, so an unmerge (or a merge on top) is refused."""
        recorded = getattr(self, "_merged_fingerprint", None)
        if self.merged and recorded is not None and not _same_fingerprint(recorded, _fingerprint(self.base_layer)):
            raise MergeError(
                f"{layer_name}: its base weights changed since {self.merged} were merged (edited in place), so"
                " unmerging would not give the original weights back; nothing was changed (reload the base model,"
                " or merge_and_unload to keep the edited weights)"
            )

    def _check_input_order(self, target: set[str], layer_name: str) -> None:
        """Merged input adapters must act next to the weight: added after every active unmerged one.

        An input adapter may be any linear map of the input (OFT's rotation), so input adapters do
        not commute: the merged ones must be a prefix of the input adapters' merge order.
        """
        order = list(self.adapters.keys())
        inputs = [n for n in order if self._get(n).site is Site.INPUT]
        merged = [n for n in inputs if n in target]
        waiting = [n for n in inputs if n in self.active and n not in target]
        if merged and waiting and order.index(waiting[-1]) > order.index(merged[0]):
            raise MergeError(
                f"{layer_name}: cannot merge input adapter {merged[0]!r} while input adapter {waiting[-1]!r},"
                " added after it, stays active and unmerged (it acts between the input and the merged one);"
                " merge it too"
            )

    def rebuild(self, target: set[str], *, safe: bool, layer_name: str) -> None:
        """Bring the layer to the merged set ``target``: unmerge the stack (LIFO), merge ``target`` in site order."""
        if target == set(self.merged):
            return
        self._check(target, layer_name)
        snapshot = {k: v.detach().clone() for k, v in self.base_layer.state_dict().items()}
        try:
            for name in reversed(self.merged):
                self._get(name).unmerge(self.base_layer)
            ordered = self._sorted(target)
            for name in ordered:
                self._get(name).merge(self.base_layer)
            if safe:
                for key, value in self.base_layer.state_dict().items():
                    if value.is_floating_point() and not torch.isfinite(value).all():
                        raise MergeError(f"{layer_name}: merging {ordered} gives non-finite values in {key}")
        except BaseException:
            with torch.no_grad():
                for key, value in self.base_layer.state_dict().items():
                    value.copy_(snapshot[key])
            raise
        self.merged = ordered

    def _get(self, name: str) -> LayerAdapter:
        return cast(LayerAdapter, self.adapters[name])

    def get_adapter(self, name: str) -> LayerAdapter:
        if name not in self.adapters:
            raise AdapterNotFoundError(f"layer has no adapter {name!r}")
        return self._get(name)

    def extra_repr(self) -> str:
        return f"active={list(self.active)}, merged={self.merged}"


def _fingerprint(module: nn.Module) -> dict[str, tuple[float, float]]:
    """Sum and sum of squares (in float64) of each floating tensor of ``module``: what an in-place edit changes."""
    out = {}
    with torch.no_grad():
        for key, value in module.state_dict().items():
            if value.is_floating_point() and value.device.type != "meta":
                wide = value.double()
                out[key] = (float(wide.sum()), float(wide.square().sum()))
    return out


def _same_fingerprint(a: dict[str, tuple[float, float]], b: dict[str, tuple[float, float]]) -> bool:
    """Equal up to the rounding of the reductions (whose order may change with the number of threads)."""
    if a.keys() != b.keys():
        return False
    for key, (sum_a, sq_a) in a.items():
        sum_b, sq_b = b[key]
        scale = max(sq_a, sq_b) ** 0.5 * 1e-9 + 1e-30
        if abs(sum_a - sum_b) > scale * 1e3 or abs(sq_a - sq_b) > max(sq_a, sq_b) * 1e-9:
            return False
    return True
