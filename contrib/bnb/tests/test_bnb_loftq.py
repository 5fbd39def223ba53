"""LoftQ for a model loaded in 4 bits (QLoRA): replace_lora_weights_loftq reads the original weights from the
checkpoint and starts each adapter on the rank-r SVD of W − Q, Q the layer's own (dequantized) weight."""

from __future__ import annotations

import copy
from pathlib import Path

import grafting_bnb.plugin  # noqa: F401 - the codec plugin the dequantization goes through
import pytest
import torch
from grafting_bnb import quantize_linears

import grafting
from grafting.testing import assert_close, model_output, sample_inputs, tiny_llama

INPUTS = sample_inputs("llama")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def test_replace_lora_weights_loftq_on_a_4bit_model(tmp_path: Path) -> None:
    original = tiny_llama(hidden=64)
    original.save_pretrained(tmp_path / "base")
    weights = {n: m.weight.detach().clone() for n, m in original.named_modules() if n.endswith(tuple(TARGETS))}
    config = grafting.LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS)
    model = grafting.get_peft_model(quantize_linears(copy.deepcopy(original), bits=4).train(), config)
    start = model_output(model, INPUTS)  # B = 0: the quantized model
    asked: list[str] = []

    def keep_all_but_v(peft_model: torch.nn.Module, name: str) -> bool:
        asked.append(name)
        return not name.endswith("v_proj")

    layers = {n: m for n, m in grafting.toolkit.candidate_modules(model.get_base_model()) if n in weights}
    untouched = {n: layers[n].adapters["default"].lora_A.weight.clone() for n in layers if n.endswith("v_proj")}
    grafting.replace_lora_weights_loftq(model, model_path=str(tmp_path / "base"), callback=keep_all_but_v)
    assert sorted(asked) == sorted(weights)
    for name, layer in layers.items():
        adapter = layer.adapters["default"]
        if name in untouched:  # the callback refused: rolled back
            assert torch.equal(adapter.lora_A.weight, untouched[name])
            assert not adapter.lora_B.weight.any()
            continue
        error = weights[name] - grafting.toolkit.dense_weight(layer.base_layer)
        u, s, vh = torch.linalg.svd(error.double(), full_matrices=False)
        best = (u[:, :4] * s[:4]) @ vh[:4]
        assert_close((adapter.lora_B.weight @ adapter.lora_A.weight).double(), best, rtol=1e-5, atol=1e-6)
    reference = model_output(original, INPUTS)
    assert (model_output(model, INPUTS) - reference).norm() < (start - reference).norm()


def test_replace_lora_weights_loftq_needs_quantized_lora_layers(tmp_path: Path) -> None:
    original = tiny_llama(hidden=64)
    original.save_pretrained(tmp_path / "base")
    model = grafting.get_peft_model(copy.deepcopy(original), grafting.LoraConfig(target_modules=TARGETS))
    with pytest.raises(grafting.ConfigError, match="quantized"):
        grafting.replace_lora_weights_loftq(model, model_path=str(tmp_path / "base"))
    quantized = grafting.get_peft_model(quantize_linears(copy.deepcopy(original), bits=4), grafting.LoraConfig())
    with pytest.raises(grafting.ConfigError, match=r"model\.safetensors"):
        grafting.replace_lora_weights_loftq(quantized, model_path=str(tmp_path / "missing"))
    config = grafting.LoraConfig(target_modules=TARGETS, init_lora_weights="loftq", loftq_config=grafting.LoftQConfig())
    with pytest.raises(grafting.ConfigError, match="replace_lora_weights_loftq"):
        grafting.get_peft_model(quantize_linears(copy.deepcopy(original), bits=4), config)
