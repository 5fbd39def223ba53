"""Method-scoped hooks reach only their own method's implementation; one add_adapter shares one context."""

from __future__ import annotations

import ast
import importlib.metadata
from pathlib import Path
from typing import Any

import attrs
import pytest
from torch import nn

import grafting
from grafting.errors import UnknownMethodError
from grafting.registry import method as method_module
from grafting.registry import plugins
from tests.helpers import base_model
from tests.toy_methods import ToyDelta, ToyDeltaConfig

ROOT = Path(__file__).resolve().parents[1]


def _config_class(peft_type: str) -> type:
    return attrs.define(kw_only=True)(
        type(f"{peft_type.title()}Config", (grafting.AdapterConfig,), {"peft_type": peft_type, "__annotations__": {}})
    )


class _Recorder:
    """Serves one method and records every config its hooks were handed."""

    def __init__(self, peft_type: str, config_class: type) -> None:
        self.peft_type, self.config_class = peft_type, config_class
        self.seen: list[str] = []
        self.contexts: list[grafting.AdapterContext] = []

    @grafting.hookimpl
    def grafting_create_layer_adapter(
        self, config: Any, base_layer: nn.Module, module_name: str, context: grafting.AdapterContext
    ) -> nn.Module | None:
        self.seen.append(type(config).__name__)
        self.contexts.append(context)
        context.state.setdefault("made", []).append(module_name)
        return ToyDelta(base_layer, 0.1, seed=len(self.seen)) if isinstance(base_layer, nn.Linear) else None


class _Declares:
    """One plugin declaring two methods, each served by its own hooks object."""

    def __init__(self, first: _Recorder, second: _Recorder) -> None:
        self.first, self.second = first, second

    @grafting.hookimpl
    def grafting_methods(self) -> list[grafting.Method]:
        return [
            grafting.Method(peft_type=r.peft_type, name=r.peft_type.lower(), config_class=r.config_class, hooks=r)
            for r in (self.first, self.second)
        ]


@pytest.fixture
def two_methods() -> Any:
    first = _Recorder("DISPATCH_ONE", _config_class("DISPATCH_ONE"))
    second = _Recorder("DISPATCH_TWO", _config_class("DISPATCH_TWO"))
    plugin = _Declares(first, second)
    grafting.register_plugin(plugin, name="dispatch-test")
    yield first, second
    grafting.unregister_plugin(plugin)


@pytest.mark.usefixtures("toy_methods")
def test_each_method_hook_sees_only_its_own_configs(two_methods: tuple[_Recorder, _Recorder]) -> None:
    first, second = two_methods
    model = grafting.get_peft_model(base_model("llama"), first.config_class(target_modules=["q_proj"]), mixed=True)
    model.add_adapter("other", second.config_class(target_modules=["v_proj"]))
    model.add_adapter("toy", ToyDeltaConfig(target_modules=["k_proj"]))  # another plugin's method
    assert first.seen
    assert set(first.seen) == {first.config_class.__name__}
    assert second.seen
    assert set(second.seen) == {second.config_class.__name__}


def test_one_add_adapter_shares_one_context_and_the_next_gets_a_fresh_one(
    two_methods: tuple[_Recorder, _Recorder],
) -> None:
    first, _ = two_methods
    model = grafting.get_peft_model(base_model("llama"), first.config_class(target_modules=["q_proj", "v_proj"]))
    calls = len(first.contexts)
    assert calls >= 2
    assert all(c is first.contexts[0] for c in first.contexts)
    context = first.contexts[0]
    assert context.adapter_name == "default"
    assert context.model is model.base_model.model
    assert context.state["made"] == list(context.targets)  # every target, in model order
    model.add_adapter("second", first.config_class(target_modules=["q_proj"]))
    assert first.contexts[-1] is not context
    assert first.contexts[-1].state["made"] == list(first.contexts[-1].targets)


def test_an_extension_plugin_declaring_no_method_sees_every_method(two_methods: tuple[_Recorder, _Recorder]) -> None:
    first, second = two_methods
    seen: list[str] = []

    class Extension:
        @grafting.hookimpl(tryfirst=True)
        def grafting_create_layer_adapter(self, config: Any) -> None:
            seen.append(str(config.peft_type))

    extension = Extension()
    grafting.register_plugin(extension, name="extension")
    try:
        model = grafting.get_peft_model(base_model("llama"), first.config_class(target_modules=["q_proj"]), mixed=True)
        model.add_adapter("b", second.config_class(target_modules=["q_proj"]))
    finally:
        grafting.unregister_plugin(extension)
    assert {"DISPATCH_ONE", "DISPATCH_TWO"} <= set(seen)


def test_unregistering_a_plugin_removes_the_hooks_of_its_methods(two_methods: tuple[_Recorder, _Recorder]) -> None:
    first, _ = two_methods
    registry = grafting.get_registry()
    assert registry.pm.is_registered(first)
    method = registry.method("DISPATCH_ONE")
    assert [i.plugin for i in registry.method_hook(method, "grafting_create_layer_adapter").get_hookimpls()] == [first]


def _hook_guards(path: Path) -> list[str]:
    """Hook implementations in ``path`` that test their ``config`` argument's class."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef) or not node.name.startswith("grafting_"):
            continue
        for inner in ast.walk(node):
            if (
                isinstance(inner, ast.Call)
                and isinstance(inner.func, ast.Name)
                and inner.func.id == "isinstance"
                and isinstance(inner.args[0], ast.Name)
                and inner.args[0].id == "config"
            ):
                found.append(f"{path}:{inner.lineno} {node.name}")
    return found


def test_no_method_plugin_guards_a_hook_on_its_config_class() -> None:
    sources = sorted(ROOT.glob("plugins/*/src/*/*.py")) + sorted(ROOT.glob("contrib/*/src/*/*.py"))
    assert sources
    assert [g for path in sources for g in _hook_guards(path)] == []


def test_the_guard_checker_finds_a_guard(tmp_path: Path) -> None:
    bad = tmp_path / "plugin.py"
    bad.write_text(
        "def grafting_create_layer_adapter(config, base_layer):\n"
        "    if not isinstance(config, LoraConfig):\n        return None\n"
    )
    assert len(_hook_guards(bad)) == 1


def test_an_entry_point_advertises_an_out_of_tree_method_without_a_core_edit(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.metadata.entry_points

    def fake(**kwargs: Any) -> Any:
        if kwargs.get("group") == method_module.KNOWN_METHODS_GROUP:
            return [
                importlib.metadata.EntryPoint(
                    name="SHINY", value="grafting-shiny:ShinyConfig", group=method_module.KNOWN_METHODS_GROUP
                )
            ]
        return real(**kwargs)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)
    method_module.known_methods.cache_clear()
    try:
        assert method_module.distribution_of("SHINY") == "grafting-shiny"
        assert method_module.peft_type_of_config("ShinyConfig") == "SHINY"
        assert method_module.distribution_of("LORA") == "grafting-lora"  # the seed stays
        with pytest.raises(UnknownMethodError, match=r"pip install grafting-shiny"):
            grafting.ShinyConfig  # noqa: B018
        with pytest.raises(UnknownMethodError, match=r"pip install grafting-shiny"):
            grafting.get_peft_config({"peft_type": "SHINY"})
    finally:
        monkeypatch.setattr(importlib.metadata, "entry_points", real)
        method_module.known_methods.cache_clear()
    assert plugins.missing_method_message("SHINY") == "no installed grafting plugin provides the method 'SHINY'"


def test_an_adapter_beyond_peft_warns_once_naming_the_modules(two_methods: tuple[_Recorder, _Recorder]) -> None:
    first, _ = two_methods

    class Beyond(ToyDelta):
        peft_loadable = False

    class BeyondExtension:
        @grafting.hookimpl(tryfirst=True)
        def grafting_create_layer_adapter(self, config: Any, base_layer: nn.Module) -> nn.Module | None:
            ok = isinstance(config, first.config_class) and isinstance(base_layer, nn.Linear)
            return Beyond(base_layer, 0.1, seed=0) if ok else None

    extension = BeyondExtension()
    grafting.register_plugin(extension, name="beyond")
    try:
        with pytest.warns(grafting.BeyondPeftWarning, match=r"q_proj.*PEFT cannot load") as caught:
            grafting.get_peft_model(base_model("llama"), first.config_class(target_modules=["q_proj"]))
    finally:
        grafting.unregister_plugin(extension)
    assert len([w for w in caught if issubclass(w.category, grafting.BeyondPeftWarning)]) == 1
