"""The plugin manager: in-process registration, entry points, conflicts, unknown methods, lazy configs."""

from __future__ import annotations

import importlib.metadata
import re
import sys
import types

import pytest
import torch
from torch import nn

import grafting
from grafting.errors import PluginConflictError, PluginError, UnknownMethodError
from grafting.model.layer import AdaptedLayer
from grafting.registry import plugins
from grafting.testing import assert_close
from tests.helpers import base_logits, base_model, logits
from tests.toy_methods import ToyDelta, ToyDeltaConfig, ToyPlugin


def _plugin_module(name: str, peft_type: str) -> types.ModuleType:
    """A plugin module declaring one method ``peft_type`` (with a throwaway config class)."""
    import attrs

    config_class = attrs.define(kw_only=True)(
        type(f"{peft_type.title()}Config", (grafting.AdapterConfig,), {"peft_type": peft_type, "__annotations__": {}})
    )
    module = types.ModuleType(name)

    @grafting.hookimpl
    def grafting_methods() -> list[grafting.Method]:
        return [grafting.Method(peft_type=peft_type, name=peft_type.lower(), config_class=config_class)]

    module.grafting_methods = grafting_methods  # type: ignore[attr-defined]
    return module


class _BrokenEntryPoint:
    """An entry point whose plugin module raises when imported."""

    name = "broken"
    value = "grafting_broken_plugin.plugin"
    group = plugins.ENTRY_POINT_GROUP
    dist = None

    def load(self) -> object:
        raise ImportError("No module named 'some_missing_dependency'")


def _entry_point(name: str, module: str) -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name=name, value=module, group=plugins.ENTRY_POINT_GROUP)


def _fake_entry_points(monkeypatch: pytest.MonkeyPatch, entry_points: list[object]) -> None:
    def fake(**kwargs: object) -> list[object]:
        assert kwargs.get("group") == plugins.ENTRY_POINT_GROUP
        return list(entry_points)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)


# -- in-process registration -------------------------------------------------------------------
def test_registered_toy_method_is_found_and_resolves_its_config(toy_methods: ToyPlugin) -> None:
    method = grafting.get_method("TOY_DELTA")
    assert method.config_class is ToyDeltaConfig
    assert grafting.get_method("toy_delta") is method  # the short name works too
    assert grafting.ToyDeltaConfig is ToyDeltaConfig  # lazy attribute of the package
    assert "TOY_DELTA" in grafting.get_registry().methods


def test_toy_delta_adapter_computes_its_formula_and_merges(toy_methods: ToyPlugin) -> None:
    model = grafting.get_peft_model(base_model("llama"), ToyDeltaConfig(target_modules=["v_proj"]))
    layers = dict(model.base_model.adapted_layers())
    assert sorted(layers) == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    layer = layers["model.layers.0.self_attn.v_proj"]
    adapter = layer.adapters["default"]
    assert isinstance(adapter, ToyDelta)
    x = torch.randn(2, 3, layer.base_layer.in_features)
    with torch.no_grad():
        expected = layer.base_layer(x) + x @ adapter.toy_d.T
        assert_close(layer(x), expected, changed_from=layer.base_layer(x), msg="toy delta forward")
    out = logits(model, "llama")
    model.merge_adapter()
    assert_close(logits(model, "llama"), out, changed_from=base_logits("llama"), msg="merged toy delta")


def test_unregistering_removes_the_method() -> None:
    plugin = _plugin_module("grafting_temporary", "TEMPORARY_METHOD")
    grafting.register_plugin(plugin, name="temporary")
    assert grafting.get_method("TEMPORARY_METHOD").name == "temporary_method"
    grafting.unregister_plugin(plugin)
    with pytest.raises(UnknownMethodError):
        grafting.get_method("TEMPORARY_METHOD")


def test_registering_one_plugin_twice_is_an_error(toy_methods: ToyPlugin) -> None:
    with pytest.raises(PluginError):
        grafting.register_plugin(toy_methods)


def test_two_plugins_claiming_one_peft_type_conflict() -> None:
    registry = plugins.Registry(load_entry_points=False)
    registry.register(_plugin_module("first_plugin", "TWIN"), name="first", distribution="grafting-first")
    with pytest.raises(PluginConflictError, match=r"TWIN.*grafting-first.*grafting-second") as info:
        registry.register(_plugin_module("second_plugin", "TWIN"), name="second", distribution="grafting-second")
    assert info.value.peft_types == ["TWIN"]
    # the registry is as it was before the failed registration
    assert registry.method("TWIN").distribution == "grafting-first"
    assert not registry.pm.has_plugin("second")


def test_a_declaration_that_is_not_a_method_is_refused() -> None:
    registry = plugins.Registry(load_entry_points=False)
    module = types.ModuleType("bad_plugin")
    module.grafting_methods = grafting.hookimpl(lambda: ["LORA"])  # type: ignore[attr-defined]
    with pytest.raises(PluginError, match=r"not a grafting\.Method"):
        registry.register(module, name="bad")


def test_a_more_specific_plugin_takes_precedence_with_tryfirst(toy_methods: ToyPlugin) -> None:
    """firstresult hooks: a plugin may provide its own adapter for an existing method's config."""
    from grafting_lora import LoraConfig

    class Override:
        @grafting.hookimpl(tryfirst=True)
        def grafting_create_layer_adapter(self, config: object, base_layer: nn.Module, adapter_name: str) -> object:
            if isinstance(config, LoraConfig) and isinstance(base_layer, nn.Linear):
                return ToyDelta(base_layer, 0.1, seed=0)
            return None

    override = Override()
    grafting.register_plugin(override, name="override")
    try:
        model = grafting.get_peft_model(base_model("llama"), LoraConfig(target_modules=["q_proj"]))
    finally:
        grafting.unregister_plugin(override)
    adapters = [layer.adapters["default"] for _, layer in model.base_model.adapted_layers()]
    assert adapters
    assert all(isinstance(a, ToyDelta) for a in adapters)


# -- entry points -----------------------------------------------------------------------------------
def test_entry_points_load_and_a_broken_plugin_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "grafting_fake_good", _plugin_module("grafting_fake_good", "GOOD_ONE"))
    _fake_entry_points(
        monkeypatch,
        [_entry_point("lora", "grafting_lora.plugin"), _BrokenEntryPoint(), _entry_point("good", "grafting_fake_good")],
    )
    registry = plugins.Registry(load_entry_points=True)
    assert {"LORA", "GOOD_ONE"} <= set(registry.methods)
    assert registry.method("LORA").entry_point == "grafting_lora.plugin"
    assert len(registry.failures) == 1
    failure = registry.failures[0]
    assert failure.entry_point == "broken = grafting_broken_plugin.plugin"
    assert "ImportError" in failure.error
    assert "some_missing_dependency" in failure.error
    assert "Traceback" in failure.traceback
    # asking for a method that is missing mentions the failed plugin
    with pytest.raises(UnknownMethodError, match=re.escape("broken = grafting_broken_plugin.plugin")):
        registry.method("PREFIX_TUNING")


def test_entry_point_of_a_missing_module_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_entry_points(
        monkeypatch,
        [_entry_point("ghost", "grafting_no_such_module_xyz"), _entry_point("lora", "grafting_lora.plugin")],
    )
    registry = plugins.Registry()
    assert "LORA" in registry.methods
    assert [f.entry_point for f in registry.failures] == ["ghost = grafting_no_such_module_xyz"]
    assert "ModuleNotFoundError" in registry.failures[0].error


def test_installed_plugins_claiming_one_peft_type(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both stay unusable for that type, asking for it raises the conflict, the other methods load."""
    monkeypatch.setitem(sys.modules, "grafting_twin_a", _plugin_module("grafting_twin_a", "TWIN"))
    monkeypatch.setitem(sys.modules, "grafting_twin_b", _plugin_module("grafting_twin_b", "TWIN"))
    _fake_entry_points(
        monkeypatch,
        [
            _entry_point("twin_a", "grafting_twin_a"),
            _entry_point("lora", "grafting_lora.plugin"),
            _entry_point("twin_b", "grafting_twin_b"),
        ],
    )
    registry = plugins.Registry()
    assert registry.method("LORA").name == "lora"
    with pytest.raises(PluginConflictError, match="TWIN"):
        registry.method("TWIN")
    assert [f.entry_point for f in registry.failures] == ["twin_b = grafting_twin_b"]


def test_the_installed_lora_plugin_is_discovered_from_its_entry_point() -> None:
    registry = plugins.Registry()
    method = registry.method("LORA")
    assert method.distribution == "grafting-lora"
    assert method.entry_point == "grafting_lora.plugin"
    assert method.version


# -- unknown methods and lazy config names -------------------------------------------------------------
def test_unknown_peft_type_names_the_distribution_to_install(lora_only_registry: plugins.Registry) -> None:
    with pytest.raises(UnknownMethodError, match=r"PREFIX_TUNING.*pip install grafting-prefix"):
        grafting.get_method("PREFIX_TUNING")
    with pytest.raises(UnknownMethodError, match="pip install grafting-prefix"):
        grafting.get_peft_config({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4})


def test_an_unheard_of_peft_type_has_no_install_hint(lora_only_registry: plugins.Registry) -> None:
    with pytest.raises(UnknownMethodError) as info:
        grafting.get_method("NOT_A_METHOD")
    assert "NOT_A_METHOD" in str(info.value)
    assert "pip install" not in str(info.value)


def test_lazy_config_names(lora_only_registry: plugins.Registry) -> None:
    from grafting_lora import LoraConfig

    assert grafting.LoraConfig is LoraConfig
    with pytest.raises(UnknownMethodError, match="pip install grafting-prefix"):
        _ = grafting.PromptTuningConfig
    with pytest.raises(AttributeError, match="NoSuchConfig"):
        _ = grafting.NoSuchConfig


def test_loading_a_folder_of_a_missing_method_names_the_distribution(
    lora_only_registry: plugins.Registry, tmp_path: object
) -> None:
    import json
    import os

    folder = os.path.join(str(tmp_path), "prefix")
    os.makedirs(folder)
    with open(os.path.join(folder, "adapter_config.json"), "w") as fh:
        json.dump({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "task_type": "CAUSAL_LM"}, fh)
    model = base_model("llama")
    with pytest.raises(UnknownMethodError, match="pip install grafting-prefix"):
        grafting.PeftModel.from_pretrained(model, folder)
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())


def test_toy_adapter_round_trips_through_save_and_load(toy_methods: ToyPlugin, tmp_path: object) -> None:
    model = grafting.get_peft_model(base_model("gpt2"), ToyDeltaConfig(target_modules=["c_fc"], scale=0.05))
    out = logits(model, "gpt2")
    model.save_pretrained(str(tmp_path))
    loaded = grafting.PeftModel.from_pretrained(base_model("gpt2"), str(tmp_path))
    assert isinstance(loaded.peft_config["default"], ToyDeltaConfig)
    assert loaded.peft_config["default"].scale == 0.05
    assert_close(logits(loaded, "gpt2"), out, changed_from=base_logits("gpt2"), msg="reloaded toy delta")
