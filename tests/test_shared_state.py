"""Shared adapter state of layer methods (ARCHITECTURE.md, "Shared adapter state"), on the toy TOY_SHARED method.

Created once per adapter with every target, handed to each layer adapter,
saved once as ``base_model.<key>``, loaded strictly, merged and routed
through its layer adapters, dropped with its adapter; and the plugin
contract's checks (hook answers, misspelled hooks, tensors left on meta).
"""

from __future__ import annotations

import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import grafting
from grafting import AdapterLoadError, PluginError
from grafting.cli import inspect_adapter
from grafting.model.layer import AdaptedLayer
from grafting.model.weights import in_out_features
from grafting.testing import assert_close, assert_identical
from tests.helpers import (
    ATTENTION,
    LINEAR,
    base_logits,
    base_model,
    logits,
    loss_inputs,
)
from tests.helpers import toy_adapted as adapted
from tests.toy_methods import ToyBank, ToyDeltaConfig, ToyPlugin, ToySharedConfig, ToySharedDelta


def _config(arch: str, **kwargs: object) -> ToySharedConfig:
    kwargs.setdefault("target_modules", LINEAR[arch])
    return ToySharedConfig(**kwargs)  # type: ignore[arg-type]


def _layer_adapters(model: object, name: str = "default") -> list[ToySharedDelta]:
    return [layer.adapters[name] for _, layer in model.base_model.adapted_layers() if name in layer.adapters]  # type: ignore[attr-defined]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_created_once_with_every_target_and_handed_to_each_layer(toy_methods: ToyPlugin, arch: str) -> None:
    toy_methods.shared_calls.clear()
    model = adapted(arch, _config(arch))
    layers = [path for path, _ in model.base_model.adapted_layers()]
    assert toy_methods.shared_calls == [layers]  # one call, every target, model order
    bank = model.base_model.shared_states["default"]
    assert isinstance(bank, ToyBank)
    sizes = [in_out_features(layer.base_layer) for _, layer in model.base_model.adapted_layers()]
    assert tuple(bank.toy_bank.shape) == (max(s[1] for s in sizes), max(s[0] for s in sizes))
    adapters = _layer_adapters(model)
    assert all(a.shared is bank for a in adapters)
    assert all(set(a.state_dict()) == {"toy_v"} for a in adapters)  # a reference, not a submodule
    out = logits(model, arch)
    with model.disable_adapter():
        assert_close(logits(model, arch), base_logits(arch), changed_from=out, msg="the shared bank takes part")


def test_saved_once_under_base_model_and_loaded_strictly(toy_methods: ToyPlugin, tmp_path: object) -> None:
    model = adapted("llama", _config("llama", seed=3))
    state = grafting.get_peft_model_state_dict(model)
    assert tuple(state["base_model.toy_bank"].shape) == tuple(model.base_model.shared_states["default"].toy_bank.shape)
    assert [k for k in state if "toy_bank" in k] == ["base_model.toy_bank"]
    expected = logits(model, "llama")
    model.save_pretrained(tmp_path)
    loaded = grafting.PeftModel.from_pretrained(base_model("llama"), tmp_path)
    assert_identical(loaded.base_model.shared_states["default"].toy_bank, state["base_model.toy_bank"], msg="bank")
    assert_close(logits(loaded, "llama"), expected, changed_from=base_logits("llama"), msg="loaded logits")
    # strict: the file must hold the shared tensor, and a model without it must not take one
    del state["base_model.toy_bank"]
    fresh = adapted("llama", _config("llama", seed=3))
    result = grafting.set_peft_model_state_dict(fresh, state)
    assert result.missing_keys == ["base_model.toy_bank"]


def test_a_wrong_shared_shape_is_refused_before_anything_is_written(toy_methods: ToyPlugin) -> None:
    model = adapted("llama", _config("llama"))
    state = grafting.get_peft_model_state_dict(model)
    state["base_model.toy_bank"] = state["base_model.toy_bank"][:-1]
    before = {k: v.clone() for k, v in grafting.get_peft_model_state_dict(model).items()}
    with pytest.raises(AdapterLoadError, match=r"base_model\.toy_bank has shape"):
        grafting.set_peft_model_state_dict(model, state)
    assert_identical(grafting.get_peft_model_state_dict(model), before, msg="after the refused load")


def test_a_non_persistent_shared_buffer_is_regenerated_not_saved(toy_methods: ToyPlugin, tmp_path: object) -> None:
    model = adapted("gpt2", _config("gpt2", save_bank=False, seed=5))
    assert not any("toy_bank" in k for k in grafting.get_peft_model_state_dict(model))
    expected = logits(model, "gpt2")
    model.save_pretrained(tmp_path)
    loaded = grafting.PeftModel.from_pretrained(base_model("gpt2"), tmp_path)
    assert_close(logits(loaded, "gpt2"), expected, changed_from=base_logits("gpt2"), msg="loaded logits")


def test_a_buffer_left_on_meta_is_a_load_error_naming_it(toy_methods: ToyPlugin, tmp_path: object) -> None:
    model = adapted("llama", _config("llama", save_bank=False, bank_device=None))
    model.save_pretrained(tmp_path)
    base = base_model("llama")
    with pytest.raises(AdapterLoadError, match=r"shared_states\.default\.toy_bank"):
        grafting.PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, AdaptedLayer) for m in base.modules())  # the failed load gave the model back


@settings(max_examples=4, deadline=None)
@given(arch=st.sampled_from(["llama", "gpt2"]), seed=st.integers(0, 2**16))
def test_merge_routing_and_mixing_go_through_the_layer_adapters(toy_methods: ToyPlugin, arch: str, seed: int) -> None:
    model = grafting.get_peft_model(
        base_model(arch, torch.float64), _config(arch, seed=seed, target_modules=ATTENTION[arch]), mixed=True
    )
    model.add_adapter("delta", ToyDeltaConfig(target_modules=ATTENTION[arch]))
    model.add_adapter("other", _config(arch, seed=seed + 1, target_modules=ATTENTION[arch]))
    assert model.base_model.shared_states["other"] is not model.base_model.shared_states["default"]
    model.set_adapter(["default", "delta"])
    both = logits(model, arch)
    model.set_adapter("default")
    alone = logits(model, arch)
    model.set_adapter("other")
    other = logits(model, arch)
    plain = base_logits(arch, dtype=torch.float64)
    routed = logits(model, arch, adapter_names=["default", "other", "__base__"])
    tight = {"rtol": 1e-10, "atol": 1e-10}  # float64: rounding near 1e-15
    assert_close(routed[0], alone[0], changed_from=plain[0], **tight, msg="routed to default")
    assert_close(routed[1], other[1], changed_from=alone[1], **tight, msg="routed to other")
    assert_close(routed[2], plain[2], changed_from=alone[2], **tight, msg="routed to the base")
    model.set_adapter(["default", "delta"])
    model.merge_adapter()
    assert_close(logits(model, arch), both, changed_from=alone, msg="merged")
    model.unmerge_adapter()
    assert_close(logits(model, arch), both, changed_from=alone, **tight, msg="unmerged")


def test_delete_adapter_drops_its_shared_state(toy_methods: ToyPlugin) -> None:
    model = adapted("llama", _config("llama"))
    model.add_adapter("second", _config("llama", seed=1))
    model.delete_adapter("default")
    assert list(model.base_model.shared_states) == ["second"]
    assert all(not name.startswith("base_model.shared_states.default") for name, _ in model.named_buffers())


def test_shared_parameters_train_with_their_adapter(toy_methods: ToyPlugin) -> None:
    model = adapted("llama", _config("llama", train_bank=True))
    model.add_adapter("second", _config("llama", seed=1, train_bank=True))
    first, second = model.base_model.shared_states["default"], model.base_model.shared_states["second"]
    assert first.toy_bank.requires_grad
    assert not second.toy_bank.requires_grad
    model.set_adapter("second")
    assert second.toy_bank.requires_grad
    assert not first.toy_bank.requires_grad
    model(**loss_inputs("llama")).loss.backward()
    assert second.toy_bank.grad is not None
    assert second.toy_bank.grad.abs().sum() > 0
    assert first.toy_bank.grad is None


def test_inspect_lists_shared_keys_and_checks_their_shapes(toy_methods: ToyPlugin, tmp_path: object) -> None:
    seen: list[dict[str, tuple[int, ...]]] = []

    class Checker:
        @grafting.hookimpl
        def grafting_check_saved_shapes(self, config: object, shapes: dict[str, tuple[int, ...]]) -> list[str] | None:
            if not isinstance(config, ToySharedConfig):
                return None
            seen.append(shapes)
            return []

    adapted("llama", _config("llama")).save_pretrained(tmp_path)
    checker = Checker()
    grafting.register_plugin(checker)
    try:
        info = inspect_adapter.describe(tmp_path)  # type: ignore[arg-type]
    finally:
        grafting.unregister_plugin(checker)
    assert info["shared"] == ["base_model.toy_bank"]
    assert "base_model.toy_bank" in seen[0]
    assert "shared      base_model.toy_bank" in inspect_adapter.render(info)


# -- the contract's checks -------------------------------------------------------------------------------------
def test_a_hook_answer_that_is_not_an_adapter_names_the_plugin(toy_methods: ToyPlugin) -> None:
    module = types.ModuleType("sloppy_plugin")

    @grafting.hookimpl(tryfirst=True)
    def grafting_create_layer_adapter(config: object, base_layer: torch.nn.Module) -> object:
        return torch.nn.Linear(2, 2) if isinstance(config, ToyDeltaConfig) else None

    module.grafting_create_layer_adapter = grafting_create_layer_adapter  # type: ignore[attr-defined]
    grafting.register_plugin(module)
    try:
        base = base_model("llama")
        with pytest.raises(PluginError, match=r"'sloppy_plugin'.*returned a Linear, not a grafting\.LayerAdapter"):
            grafting.get_peft_model(base, ToyDeltaConfig(target_modules=["q_proj"]))
        assert not any(isinstance(m, AdaptedLayer) for m in base.modules())
    finally:
        grafting.unregister_plugin(module)


def test_a_misspelled_hook_implementation_is_an_error_naming_the_plugin() -> None:
    module = types.ModuleType("typo_plugin")

    @grafting.hookimpl
    def grafting_create_layer_adaptor(config: object) -> None:  # "adaptor": no such hook
        return None

    module.grafting_create_layer_adaptor = grafting_create_layer_adaptor  # type: ignore[attr-defined]
    with pytest.raises(PluginError, match=r"'typo_plugin'.*grafting_create_layer_adaptor"):
        grafting.register_plugin(module)
    assert not grafting.get_registry().pm.is_registered(module)


def test_a_hook_implementation_with_an_unknown_argument_is_an_error_naming_the_plugin() -> None:
    module = types.ModuleType("argument_plugin")

    @grafting.hookimpl
    def grafting_create_layer_adapter(config: object, layer: torch.nn.Module) -> None:  # "layer": not an argument
        return None

    module.grafting_create_layer_adapter = grafting_create_layer_adapter  # type: ignore[attr-defined]
    with pytest.raises(PluginError, match=r"'argument_plugin'.*layer"):
        grafting.register_plugin(module)
