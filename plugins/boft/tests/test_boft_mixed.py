"""BOFT beside LoRA on the same layers (a mixed model), per-sample routing, and the config file."""

from __future__ import annotations

import json
import warnings
from typing import Any

import peft
import pytest
import torch
from boft_helpers import base, inputs, output, randomize, use_peft_butterflies

import grafting
from grafting import LoraConfig, PeftModel, get_peft_model
from grafting.model.layer import AdaptedLayer
from grafting.testing import assert_close, model_output
from grafting_boft import BOFTConfig

TIGHT = {"rtol": 1e-10, "atol": 1e-10}
SHARED = ["q_proj", "down_proj"]


def _mixed() -> Any:
    config = BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2, target_modules=[*SHARED, "v_proj"])
    model = get_peft_model(base("llama"), config, mixed=True)
    model.add_adapter(
        "lora", LoraConfig(r=2, lora_alpha=4, target_modules=[*SHARED, "up_proj"], init_lora_weights=False)
    )
    model.set_adapter(["default", "lora"])
    randomize(model, 0)
    return model


def test_a_shared_layer_scales_the_rotated_product_and_adds_lora_on_the_original_input() -> None:
    model = _mixed()
    layers = [m for m in model.modules() if isinstance(m, AdaptedLayer) and len(m.adapters) == 2]
    assert len(layers) == 2 * len(SHARED)
    for layer in layers:
        boft, lora = layer.adapters["default"], layer.adapters["lora"]
        x = torch.randn(2, 3, layer.base_layer.in_features, dtype=torch.float64)
        with torch.no_grad():
            rotated = torch.nn.functional.linear(x @ boft.matrix(), layer.base_layer.weight) * boft.boft_s.T
            expected = rotated + layer.base_layer.bias if layer.base_layer.bias is not None else rotated
            expected = expected + x @ lora.delta_matrix().T
            assert_close(layer(x), expected, changed_from=layer.base_layer(x), **TIGHT)


def test_merging_both_keeps_the_output() -> None:
    model = _mixed()
    adapted = output(model, "llama")
    merged = model.merge_and_unload()
    assert_close(output(merged, "llama"), adapted, changed_from=output(base("llama"), "llama"), **TIGHT)


def test_each_sample_gets_its_own_adapter() -> None:
    model = _mixed()
    batch = inputs("llama")
    routes = ["lora", "default"]
    routed = model_output(model, {**batch, "adapter_names": routes})
    for i, name in enumerate(routes):
        model.set_adapter(name)
        assert_close(routed[i], model_output(model, batch)[i], msg=f"sample {i} routed to {name}")


def test_the_mix_saves_and_each_folder_loads_in_peft(tmp_path, monkeypatch) -> None:
    use_peft_butterflies(monkeypatch)
    model = _mixed()
    expected = output(model, "llama")
    plain = output(base("llama"), "llama")
    model.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(base("llama"), tmp_path, mixed=True)
    assert_close(output(ours, "llama"), expected, changed_from=plain, **TIGHT, msg="grafting")
    for name, folder in (("default", tmp_path), ("lora", tmp_path / "lora")):
        model.set_adapter(name)
        theirs = peft.PeftModel.from_pretrained(base("llama"), folder)
        assert_close(output(theirs, "llama"), output(model, "llama"), changed_from=plain, **TIGHT, msg=name)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"boft_block_size": 4, "boft_block_num": 2}, "exactly one of"),
        ({"boft_block_size": 0}, "exactly one of"),
        ({"boft_n_butterfly_factor": 0}, "boft_n_butterfly_factor"),
        ({"boft_dropout": 2.0}, "boft_dropout"),
        ({"bias": "lora_only"}, "bias"),
    ],
)
def test_invalid_config_values_are_config_errors_naming_the_field(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(grafting.ConfigError, match=match):
        BOFTConfig(**kwargs)


def test_peft_config_round_trips_and_grafting_plugins_lists_boft(capsys) -> None:
    options = {"boft_block_size": 0, "boft_block_num": 8, "boft_n_butterfly_factor": 2, "boft_dropout": 0.1}
    data = json.loads(
        json.dumps(peft.BOFTConfig(target_modules=["q"], bias="boft_only", **options).to_dict(), default=sorted)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = grafting.get_peft_config(data)
    assert isinstance(config, BOFTConfig)
    assert json.loads(config.to_json_string()) == data
    from grafting.cli import main

    assert main(["plugins"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("BOFT "))
    assert "grafting-boft" in line


def test_saved_shapes_that_contradict_the_config_are_reported() -> None:
    registry = grafting.get_registry()
    config = BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2)
    key = "base_model.model.q_proj"
    shapes = {f"{key}.boft_R": (2, 4, 4, 4), f"{key}.boft_s": (16, 1)}
    assert registry.call(registry.method("BOFT"), "grafting_check_saved_shapes", config=config, shapes=shapes) == []
    shapes = {f"{key}.boft_R": (1, 4, 4, 4), f"{key}.boft_s": (16, 2)}
    assert registry.call(registry.method("BOFT"), "grafting_check_saved_shapes", config=config, shapes=shapes) == [
        f"{key}.boft_R: 1 factors, but the config says boft_n_butterfly_factor=2",
        f"{key}.boft_s: shape [16, 2] is not (out, 1) or (1, out)",
    ]
