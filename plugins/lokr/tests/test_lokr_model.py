"""LoKr on whole models: safe merging, training, routing, mixing with LoRA, the CLI, combining."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from lokr_helpers import TARGETS, TOL, base, inputs, lokr_params, output, randomize, train_output, weights_of
from safetensors.torch import load_file, save_file

from grafting import CombinationError, LoraConfig, MergeError, get_peft_model
from grafting.cli import main
from grafting.errors import UnsupportedLayerError
from grafting.model.layer import AdaptedLayer
from grafting.testing import assert_close, assert_identical, model_output
from grafting_lokr import LoKrConfig


@pytest.mark.parametrize("arch", ["llama", "conv"])
def test_safe_merge_refuses_non_finite_weights_and_changes_nothing(arch: str) -> None:
    model = get_peft_model(base(arch), LoKrConfig(r=2, target_modules=TARGETS[arch], init_weights=False))
    randomize(model, 1)
    adapted = output(model, arch)
    plain = copy.deepcopy(model).merge_and_unload(safe_merge=True)
    assert_close(output(plain, arch), adapted, changed_from=output(base(arch), arch), **TOL, msg="safe merge")
    name, param = sorted(lokr_params(model).items())[-1]
    with torch.no_grad():
        param[0, 0] = float("inf")
    before = weights_of(model)
    with pytest.raises(MergeError, match="non-finite"):
        model.merge_adapter(safe_merge=True)
    assert_identical(weights_of(model), before, msg=f"after a refused merge ({name} is inf)")


def test_training_moves_the_adapter_only() -> None:
    model = get_peft_model(base("llama"), LoKrConfig(r=2, target_modules=TARGETS["llama"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lokr_params(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    train_output(model, "llama").backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in trainable if n.endswith(("lokr_w1", "lokr_w1_a"))}  # W1 starts at zero


def test_per_sample_routing_gives_each_sample_its_adapter() -> None:
    model = get_peft_model(base("llama"), LoKrConfig(r=2, target_modules=["q_proj", "down_proj"], init_weights=False))
    model.add_adapter("other", LoKrConfig(r=1, decompose_both=True, target_modules=["v_proj", "down_proj"]))
    randomize(model, 3)
    batch = inputs("llama", batch=3)
    alone = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        alone[name] = model_output(model, batch)
    with model.disable_adapter():
        alone["__base__"] = model_output(model, batch)
    routes = ["other", "__base__", "default"]
    routed = model_output(model, {**batch, "adapter_names": routes})
    for i, route in enumerate(routes):
        assert_close(routed[i], alone[route][i], changed_from=alone["__base__"][i] if route != "__base__" else None)


def test_lokr_and_lora_on_one_layer_add_and_merge_and_load_in_peft(tmp_path) -> None:
    import peft

    model = get_peft_model(
        base("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False), mixed=True
    )
    model.add_adapter("lokr", LoKrConfig(r=2, alpha=3, target_modules=["q_proj", "up_proj"], init_weights=False))
    model.set_adapter(["default", "lokr"])
    randomize(model, 5, adapter="lokr")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, AdaptedLayer)
    assert set(layer.adapters) == {"default", "lokr"}
    x = torch.randn(2, 3, layer.base_layer.in_features, dtype=torch.float64)
    with torch.no_grad():
        plain = layer.base_layer(x)
        deltas = [x @ layer.adapters[n].delta_matrix().T for n in ("default", "lokr")]
        assert all(d.abs().max() > 1e-3 for d in deltas)
        assert_close(layer(x), plain + deltas[0] + deltas[1], changed_from=plain, **TOL, msg="both deltas")

    expected = output(model, "llama")
    model.save_pretrained(tmp_path)
    theirs = peft.PeftMixedModel.from_pretrained(base("llama"), tmp_path, adapter_name="default")
    theirs.load_adapter(tmp_path / "lokr", adapter_name="lokr")
    theirs.set_adapter(["default", "lokr"])
    plain_out = output(base("llama"), "llama")
    assert_close(output(theirs.eval(), "llama"), expected, changed_from=plain_out, **TOL, msg="PEFT's mixed model")
    merged = model.merge_and_unload()
    assert_close(output(merged, "llama"), expected, changed_from=plain_out, **TOL, msg="both merged")


def test_lokr_combines_with_lora_into_a_lora_adapter_but_not_on_its_own() -> None:
    model = get_peft_model(base("llama"), LoKrConfig(target_modules=["q_proj"]), "a")
    model.add_adapter("b", LoKrConfig(target_modules=["q_proj"]))
    with pytest.raises(CombinationError, match="no installed plugin combines"):  # PEFT has none for LoKr either
        model.add_weighted_adapter(["a", "b"], [1, 1], "c")
    mixed = get_peft_model(
        base("llama"), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), mixed=True
    )
    mixed.add_adapter("k", LoKrConfig(r=1, target_modules=["q_proj", "v_proj"], init_weights=False))
    randomize(mixed, 6, adapter="k")
    mixed.add_weighted_adapter(["default", "k"], [0.5, 2.0], "both", combination_type="svd", svd_rank=16)
    for path, layer in mixed.base_model.adapted_layers():
        parts = [w * layer.adapters[n].delta_matrix() for n, w in (("default", 0.5), ("k", 2.0)) if n in layer.adapters]
        assert_close(layer.adapters["both"].delta_matrix(), sum(parts), changed_from=0 * parts[0], msg=path)


def test_default_targets_and_unsupported_layers() -> None:
    model = get_peft_model(base("llama"), LoKrConfig())
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}
    assert adapted == {"q_proj", "v_proj"}
    before = {n for n, _ in model.named_modules()}
    with pytest.raises(UnsupportedLayerError, match="embed_tokens"):
        model.add_adapter("bad", LoKrConfig(target_modules=["k_proj", "embed_tokens"]))
    assert {n for n, _ in model.named_modules()} == before
    with pytest.raises(UnsupportedLayerError, match="c_attn"):  # transformers' Conv1D, refused by PEFT too
        get_peft_model(base("gpt2"), LoKrConfig(target_modules=["c_attn"]))


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    status = main(list(argv))
    return status, capsys.readouterr().out


def test_the_cli_lists_the_plugin_and_checks_saved_shapes(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out = _cli(capsys, "plugins")
    line = next(line for line in out.splitlines() if line.startswith("LOKR "))
    assert line.split()[:4] == ["LOKR", "lokr", "layer", "grafting-lokr"]
    for name, config in {
        "linear": LoKrConfig(r=1, decompose_both=True, target_modules=TARGETS["llama"]),
        "conv": LoKrConfig(r=1, use_effective_conv2d=True, target_modules=TARGETS["conv"]),
    }.items():
        arch = "llama" if name == "linear" else "conv"
        get_peft_model(base(arch), config).save_pretrained(tmp_path / name)
        status, out = _cli(capsys, "inspect", str(tmp_path / name), "--json")
        assert (status, json.loads(out)["check"]["problems"]) == (0, []), name

    weights = tmp_path / "linear" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lokr_w1_a"
    tensors[key] = torch.zeros(tensors[key].shape[0], 3)
    del tensors["base_model.model.model.layers.1.mlp.up_proj.lokr_w2_b"]
    save_file(tensors, weights)
    status, out = _cli(capsys, "inspect", str(tmp_path / "linear"), "--json")
    problems = json.loads(out)["check"]["problems"]
    assert status == 1
    assert any(p.startswith("model.layers.0.self_attn.q_proj: lokr_w1_a") and "r=1" in p for p in problems), problems
    assert any(p.startswith("model.layers.1.mlp.up_proj: needs lokr_w2") for p in problems), problems
