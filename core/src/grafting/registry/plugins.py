"""Plugin discovery on pluggy: entry points, in-process registration, the method table."""

from __future__ import annotations

import importlib.metadata
import threading
import traceback
from typing import Any

import attrs
import pluggy

from grafting import protocol
from grafting.errors import PluginConflictError, PluginError, UnknownMethodError
from grafting.registry.method import Method, distribution_of

ENTRY_POINT_GROUP = "grafting"


@attrs.frozen
class PluginLoadFailure:
    """An entry point that could not be loaded, kept for ``grafting plugins``."""

    entry_point: str
    distribution: str | None
    error: str
    traceback: str


class Registry:
    """The plugin manager plus the table of methods the plugins declared."""

    def __init__(self, *, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(protocol.PROJECT)
        self.pm.add_hookspecs(protocol)
        self.failures: list[PluginLoadFailure] = []
        self.conflicts: dict[str, PluginConflictError] = {}
        self._methods: dict[str, Method] = {}
        #: peft_type -> the registered object whose hooks serve that method (``Method.hooks`` or its plugin)
        self._owners: dict[str, Any] = {}
        self._declarers: dict[str, Any] = {}  # peft_type -> the plugin that declared it
        if load_entry_points:
            self._load_entry_points()

    # -- registration -------------------------------------------------------------
    def _load_entry_points(self) -> None:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else None
            version = ep.dist.version if ep.dist is not None else None
            try:
                plugin = ep.load()
                self.register(plugin, name=ep.name, distribution=dist, version=version, entry_point=ep.value)
            except PluginConflictError as exc:  # both stay unusable for that type; others load
                for peft_type in exc.peft_types:
                    self.conflicts[peft_type] = exc
                self._record_failure(ep, dist, exc)
            except Exception as exc:  # a broken plugin must not break the others
                self._record_failure(ep, dist, exc)

    def _record_failure(self, ep: importlib.metadata.EntryPoint, dist: str | None, exc: Exception) -> None:
        self.failures.append(
            PluginLoadFailure(
                entry_point=f"{ep.name} = {ep.value}",
                distribution=dist,
                error=f"{type(exc).__name__}: {exc}",
                traceback=traceback.format_exc(),
            )
        )

    def register(
        self,
        plugin: Any,
        *,
        name: str | None = None,
        distribution: str | None = None,
        version: str | None = None,
        entry_point: str | None = None,
    ) -> list[Method]:
        """Register a plugin object or module and record the methods it declares."""
        if name is not None and self.pm.has_plugin(name):
            raise PluginError(f"a plugin named {name!r} is already registered")
        if self.pm.is_registered(plugin):
            raise PluginError(f"plugin {plugin!r} is already registered")
        hook = getattr(plugin, "grafting_methods", None)
        declared = list(hook()) if hook is not None else []
        for m in declared:
            if not isinstance(m, Method):
                raise PluginError(f"plugin {name or plugin!r} declared {m!r}, which is not a grafting.Method")
        methods = [
            attrs.evolve(
                m,
                distribution=m.distribution or distribution,
                version=m.version or version,
                entry_point=m.entry_point or entry_point,
            )
            for m in declared
        ]
        for m in methods:
            other = self._methods.get(m.peft_type)
            if other is not None:
                first = other.distribution or other.entry_point or "an in-process plugin"
                second = m.distribution or entry_point or name or "an in-process plugin"
                raise PluginConflictError(
                    f"method {m.peft_type} is declared by both {first} and {second}; uninstall one of them",
                    peft_types=[m.peft_type],
                )
        label = describe_plugin(plugin, name)
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {label}: {exc}") from None
        try:
            self.pm.check_pending()  # a @hookimpl whose name is no hook (a misspelling)
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(plugin)
            raise PluginError(
                f"plugin {label}: {exc} (a misspelled hook name? the hooks are listed in grafting.protocol)"
            ) from None
        try:
            for m in methods:
                if m.hooks is not None and not self.pm.is_registered(m.hooks):
                    self.pm.register(m.hooks, name=f"{self.pm.get_name(plugin)}:{m.peft_type}")
            self.pm.check_pending()
        except (pluggy.PluginValidationError, ValueError) as exc:
            self._drop(plugin, methods)
            raise PluginError(f"plugin {label}: the hooks of one of its methods: {exc}") from None
        for m in methods:
            self._methods[m.peft_type] = m
            self._owners[m.peft_type] = m.hooks if m.hooks is not None else plugin
            self._declarers[m.peft_type] = plugin
        return methods

    def _drop(self, plugin: Any, methods: list[Method]) -> None:
        for m in methods:
            if m.hooks is not None and self.pm.is_registered(m.hooks):
                self.pm.unregister(m.hooks)
        if self.pm.is_registered(plugin):
            self.pm.unregister(plugin)

    def unregister(self, plugin: Any) -> None:
        """Remove a plugin registered in-process, with the methods it declared."""
        mine = [m for m in self._methods.values() if self._declarers[m.peft_type] is plugin]
        for m in mine:
            del self._methods[m.peft_type], self._owners[m.peft_type], self._declarers[m.peft_type]
        self._drop(plugin, mine)

    # -- lookup ---------------------------------------------------------------------
    @property
    def methods(self) -> dict[str, Method]:
        return dict(self._methods)

    def method(self, peft_type: str) -> Method:
        """The method for an adapter_config.json ``peft_type`` (or its short name)."""
        key = str(peft_type).upper()
        if key in self.conflicts:
            raise self.conflicts[key]
        if key in self._methods:
            return self._methods[key]
        for m in self._methods.values():
            if m.name == str(peft_type):
                return m
        raise UnknownMethodError(missing_method_message(key, self))

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def method_hook(self, method: Method, hook_name: str) -> Any:
        """The hook ``hook_name`` as ``method`` sees it: its own implementation and extension plugins only.

        pluggy's own dispatch (a subset hook caller) leaves out the plugins that serve other
        methods, so a method's hook implementations never see another method's config.
        """
        mine = self._owners.get(method.peft_type)
        return self.pm.subset_hook_caller(hook_name, [o for o in self._owners.values() if o is not mine])

    def call(self, method: Method, hook_name: str, **kwargs: Any) -> Any:
        """Call a method-scoped hook for ``method``; check a ``create`` answer is what the hook promises.

        An answer of another type is a :class:`PluginError` naming the plugins that could have given it.
        """
        caller = self.method_hook(method, hook_name)
        result = caller(**kwargs)
        expected = protocol.HOOK_RESULTS.get(hook_name)
        if expected is not None and result is not None and not isinstance(result, expected):
            answering = [describe_plugin(i.plugin, i.plugin_name) for i in reversed(caller.get_hookimpls())]
            raise PluginError(
                f"plugin {' or '.join(answering)}: {hook_name} returned a {type(result).__name__}, not a"
                f" grafting.{expected.__name__} (or None)"
            )
        return result


def describe_plugin(plugin: Any, name: str | None = None) -> str:
    """A plugin's name for messages: its module (or class) and registered name."""
    what = getattr(plugin, "__name__", None) or type(plugin).__name__
    return f"{what!r}" if name is None or name == what or name.isdigit() else f"{name!r} ({what})"


def missing_method_message(peft_type: str, registry: Registry | None = None) -> str:
    dist = distribution_of(peft_type)
    msg = f"no installed grafting plugin provides the method {peft_type!r}"
    if dist:
        msg += f"; install it with `pip install {dist}`"
    if registry is not None:
        for failure in registry.failures:
            msg += f" (note: plugin {failure.entry_point} failed to load: {failure.error})"
    return msg


_lock = threading.Lock()
_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loading entry points on first use."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = Registry()
        return _registry


def register_plugin(plugin: Any, *, name: str | None = None) -> list[Method]:
    """Register a plugin in this process without installing it (tests, notebooks)."""
    return get_registry().register(plugin, name=name)


def unregister_plugin(plugin: Any) -> None:
    get_registry().unregister(plugin)


def get_method(peft_type: str) -> Method:
    return get_registry().method(peft_type)
