"""LoRA through the core's saving and loading: bit-identical round trips of random LoRA configs (DoRA, rsLoRA,
biases, patterns), the order of its patterns, its tensor names, and a rank mismatch named by its key.
(The save/load machinery itself is tests/test_io.py, on toy methods.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lora_model_helpers import ARCHS, adapted, base_logits, base_model, logits, lora, lora_configs, randomize, state_of
from safetensors.torch import load_file

import grafting
from grafting.testing import assert_close, assert_identical, check_save_load_round_trip

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
# tmp_path_factory is session-scoped: hypothesis examples each take a fresh folder from it
EXAMPLES = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _tensors(model: Any, name: str = "default") -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in grafting.get_peft_model_state_dict(model, adapter_name=name).items()}


def _config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / CONFIG).read_text(encoding="utf-8"))


@pytest.mark.parametrize("arch", ARCHS)
@EXAMPLES
@given(data=st.data(), safe_serialization=st.booleans())
def test_save_load_round_trip_is_bit_identical(
    arch: str, data: st.DataObject, safe_serialization: bool, tmp_path_factory: pytest.TempPathFactory
) -> None:
    model = adapted(arch, data.draw(lora_configs(arch)))
    randomize(model, 3)
    folder = tmp_path_factory.mktemp("adapter")
    check_save_load_round_trip(model, lambda: base_model(arch), lambda m: logits(m, arch), folder, safe_serialization)


def test_the_order_of_overlapping_patterns_survives_saving(tmp_path: Path) -> None:
    """The first rank_pattern/alpha_pattern key that matches wins, so saving must keep their order."""
    patterns = {"q_proj": 2, r"model\.layers\.0\.self_attn\.q_proj": 5}
    config = lora("llama", rank_pattern=patterns, alpha_pattern={"q_proj": 3, r".*\.0\..*q_proj": 7})
    model = adapted("llama", config)
    ranks = {p: layer.adapters["default"].r for p, layer in model.base_model.adapted_layers()}
    assert ranks["model.layers.0.self_attn.q_proj"] == 2
    model.save_pretrained(tmp_path)
    assert list(_config(tmp_path)["rank_pattern"]) == list(patterns)
    loaded = grafting.PeftModel.from_pretrained(base_model("llama"), tmp_path)
    assert loaded.peft_config["default"].rank_pattern == patterns
    assert list(loaded.peft_config["default"].rank_pattern) == list(patterns)
    assert_close(logits(loaded, "llama"), logits(model, "llama"), changed_from=base_logits("llama"), msg="reloaded")


def test_saved_lora_tensors_have_peft_names(tmp_path: Path) -> None:
    adapted("bert", lora("bert", r=3)).save_pretrained(tmp_path)
    assert _config(tmp_path)["peft_type"] == "LORA"
    keys = load_file(tmp_path / WEIGHTS)
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert not [k for k in keys if ".default." in k or ".adapters." in k or "modules_to_save" in k]


def test_a_loaded_trainable_adapter_trains_its_lora_factors(tmp_path: Path) -> None:
    adapted("gpt2").save_pretrained(tmp_path)
    loaded = grafting.PeftModel.from_pretrained(base_model("gpt2"), tmp_path, is_trainable=True)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable
    assert all(".lora_" in n for n in trainable)


def test_a_rank_mismatch_names_the_key(tmp_path: Path) -> None:
    adapted("llama", lora("llama", r=4)).save_pretrained(tmp_path)
    model = base_model("llama")
    before = state_of(model)
    with pytest.raises(
        grafting.AdapterLoadError, match=r"lora_A\.weight has shape \(4, 16\) in the file but \(2, 16\)"
    ):
        grafting.PeftModel.from_pretrained(model, tmp_path, config=lora("llama", r=2))
    assert_identical(state_of(model), before, "base model")


@pytest.mark.parametrize("arch", ARCHS)
def test_low_cpu_mem_usage_keeps_lora_and_dora_on_meta_until_loaded(arch: str) -> None:
    source = adapted(arch, lora(arch, target_modules="all-linear", use_dora=True))
    randomize(source, 4)
    model = grafting.get_peft_model(base_model(arch), source.peft_config["default"], low_cpu_mem_usage=True)
    params = dict(model.named_parameters())
    lora_params = {n: p for n, p in params.items() if ".lora_" in n}
    assert lora_params
    assert all(p.is_meta for p in lora_params.values())
    assert not any(p.is_meta for n, p in params.items() if n not in lora_params)
    result = grafting.set_peft_model_state_dict(model, _tensors(source))
    assert result.missing_keys == []
    assert result.unexpected_keys == []
    assert not any(p.is_meta for p in model.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)
    assert_close(logits(model, arch), logits(source, arch), changed_from=base_logits(arch), msg="materialized adapter")
