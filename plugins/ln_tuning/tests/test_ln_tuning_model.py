"""LN tuning on whole models: the invariants, exact merging, mixing with LoRA, precision, the CLI, refusals."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from ln_tuning_helpers import F64, NAMES, TARGETS, base, copies, inputs, output, randomize, weights_of
from safetensors.torch import load_file, save_file

import grafting
from grafting import AdapterStateError, CombinationError, LoraConfig, MergeError, get_peft_model
from grafting.cli import main
from grafting.errors import TargetNotFoundError, UnsupportedLayerError
from grafting.model.layer import AdaptedLayer
from grafting.testing import assert_close, assert_identical, check_layer_adapter_invariants, model_output
from grafting_ln_tuning import LNTuningAdapter, LNTuningConfig

ARCHS = ("llama", "gpt2", "bert", "t5", "conv")


@pytest.mark.parametrize("arch", ARCHS)
@given(data=st.data())
def test_layer_adapter_invariants_hold(arch: str, data: st.DataObject, tmp_path_factory) -> None:
    names = data.draw(st.lists(st.sampled_from(NAMES[arch]), min_size=1, unique=True))
    model = get_peft_model(base(arch), LNTuningConfig(target_modules=names))
    assert torch.equal(output(model, arch), output(base(arch), arch)), "a fresh copy computes as the layer"
    randomize(model, data.draw(st.integers(0, 99)))
    folder = str(tmp_path_factory.mktemp("inv"))
    check_layer_adapter_invariants(model, inputs(arch, batch=3), lambda: base(arch), folder)


@pytest.mark.parametrize("arch", ["llama", "conv"])
def test_merge_writes_the_copies_and_unmerge_restores_every_bit(arch: str) -> None:
    model = get_peft_model(base(arch), LNTuningConfig(target_modules=TARGETS[arch]))
    randomize(model, 1)
    adapted = output(model, arch)
    original = weights_of(base(arch))
    model.merge_adapter()
    for path, layer in model.base_model.adapted_layers():
        trained = layer.adapters["default"].ln_tuning_layers
        assert_identical(dict(layer.base_layer.named_parameters()), dict(trained.named_parameters()), msg=path)
    assert_close(output(model, arch), adapted, changed_from=output(base(arch), arch), msg="merged")
    model.unmerge_adapter()
    assert_identical(weights_of(model.unload()), original, msg="unmerged")


def test_safe_merge_refuses_a_non_finite_copy_and_changes_nothing() -> None:
    model = get_peft_model(base("llama"), LNTuningConfig())
    randomize(model, 2)
    name, param = sorted(copies(model).items())[0]
    with torch.no_grad():
        param[0] = float("nan")
    before = weights_of(model)
    with pytest.raises(MergeError, match="non-finite"):
        model.merge_adapter(safe_merge=True)
    assert_identical(weights_of(model), before, msg=f"after a refused merge ({name} is nan)")


def test_per_sample_routing_is_refused_and_the_model_left_as_it_was() -> None:
    model = get_peft_model(base("llama"), LNTuningConfig())
    randomize(model, 3)
    expected = output(model, "llama")
    with pytest.raises(AdapterStateError, match="changes the layer's weights"):
        model_output(model, {**inputs("llama"), "adapter_names": ["default", "__base__"]})
    assert_close(output(model, "llama"), expected)


def test_a_copy_of_a_linear_layer_composes_with_lora_on_it() -> None:
    """PEFT copies any module; on q_proj beside LoRA the layer computes W'x + b' + ΔW x (a grafting mix:
    PEFT's mixed model does not take LN tuning)."""
    model = get_peft_model(
        base("llama"), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), mixed=True
    )
    model.add_adapter("ln", LNTuningConfig(target_modules=["q_proj", "norm"]))
    model.set_adapter(["default", "ln"])
    randomize(model, 4, adapter="ln")
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    assert isinstance(layer, AdaptedLayer)
    copy, lora = layer.adapters["ln"].ln_tuning_layers, layer.adapters["default"]
    x = torch.randn(2, 3, copy.in_features, dtype=F64)
    with torch.no_grad():
        expected = copy(x) + x @ lora.delta_matrix().T
        assert_close(layer(x), expected, changed_from=layer.base_layer(x), rtol=1e-12, atol=1e-12)
    adapted = output(model, "llama")
    merged = model.merge_and_unload()
    assert_close(output(merged, "llama"), adapted, changed_from=output(base("llama"), "llama"), msg="both merged")


def test_a_half_precision_model_keeps_a_float32_copy_and_its_own_output_dtype() -> None:
    model = get_peft_model(base("llama").to(torch.bfloat16), LNTuningConfig())
    reference = get_peft_model(base("llama"), LNTuningConfig())
    randomize(model, 5)
    randomize(reference, 5)
    assert {p.dtype for p in copies(model).values()} == {torch.float32}
    out = output(model, "llama")
    assert out.dtype == torch.bfloat16
    error = float((out.double() - output(reference, "llama")).norm() / output(reference, "llama").norm())
    assert error < 3e-2, f"relative error {error:.3g} against the float64 model"
    layer = model.base_model.model.model.norm
    with torch.no_grad():
        assert layer.adapters["default"].fused_call(layer.base_layer, torch.ones(1, 16, dtype=torch.bfloat16)) is None


def test_default_targets_bert_unknown_layers_without_parameters_and_combining() -> None:
    model = get_peft_model(base("llama"), LNTuningConfig())
    tuned = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}
    assert tuned == {"input_layernorm", "post_attention_layernorm", "norm"}
    with pytest.raises(TargetNotFoundError, match="target_modules"):  # PEFT has no default for BERT either
        get_peft_model(base("bert"), LNTuningConfig())
    with pytest.raises(UnsupportedLayerError, match="act_fn"):
        get_peft_model(base("llama"), LNTuningConfig(target_modules=["act_fn"]))
    model.add_adapter("b", LNTuningConfig())
    with pytest.raises(CombinationError, match="no installed plugin combines"):  # PEFT has none for LN tuning
        model.add_weighted_adapter(["default", "b"], [1, 1], "c")


def test_config_round_trips_through_peft(tmp_path) -> None:
    import peft

    data: dict[str, Any] = json.loads(
        json.dumps(
            peft.LNTuningConfig(target_modules=["norm"], exclude_modules=["x"], task_type="CAUSAL_LM").to_dict(),
            default=sorted,
        )
    )
    config = grafting.get_peft_config(data)
    assert isinstance(config, LNTuningConfig)
    assert json.loads(config.to_json_string()) == data
    config.save_pretrained(tmp_path)
    assert isinstance(peft.PeftConfig.from_pretrained(tmp_path), peft.LNTuningConfig)
    assert grafting.LNTuningConfig is LNTuningConfig


def test_the_cli_lists_the_plugin_and_checks_the_file(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) in (0, 1)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("LN_TUNING "))
    assert line.split()[:4] == ["LN_TUNING", "ln_tuning", "layer", "grafting-ln-tuning"]
    get_peft_model(base("gpt2"), LNTuningConfig()).save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["check"]["problems"] == []
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.transformer.ln_f.weight"] = tensors.pop(
        "base_model.model.transformer.ln_f.ln_tuning_layers.weight"
    )
    save_file(tensors, weights)
    assert main(["inspect", str(tmp_path), "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["check"]["problems"]
    assert any(p.startswith("base_model.model.transformer.ln_f.weight: not an LN-tuning tensor") for p in problems)


def test_the_adapter_is_a_weight_adapter_named_as_peft_names_it() -> None:
    model = get_peft_model(base("gpt2"), LNTuningConfig())
    adapters = [m for m in model.modules() if isinstance(m, LNTuningAdapter)]
    assert adapters
    assert all(a.site is grafting.protocol.Site.WEIGHT for a in adapters)
    assert sorted(dict(adapters[0].named_parameters())) == ["ln_tuning_layers.bias", "ln_tuning_layers.weight"]


def test_the_install_hint_names_the_distribution() -> None:
    from grafting.registry.plugins import Registry, missing_method_message

    assert "pip install grafting-ln-tuning" in missing_method_message("LN_TUNING", Registry(load_entry_points=False))
