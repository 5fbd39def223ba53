"""LoRA's side of tests/test_reliability.py: a bad tensor after the base biases LoRA saves reaches nothing, and a
bad value of a LoRA field in a saved config is a ConfigError naming the file and the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from lora_model_helpers import adapted, base_model, lora
from safetensors.torch import load_file, save_file

import grafting
from grafting import AdapterLoadError, ConfigError
from grafting.testing import assert_identical
from grafting.testing import state_copy as full_state

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def _llama_with_biases() -> torch.nn.Module:
    from grafting.testing import tiny_llama

    model = tiny_llama()
    model.config.attention_bias = True
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    return LlamaForCausalLM(model.config).eval()


BAD_TENSORS = {
    "shape": lambda t: torch.zeros(t.shape[0] + 1, *t.shape[1:]),
    "int": lambda t: t.to(torch.int32),
    "bool": lambda t: t > 0,
    "complex": lambda t: t.to(torch.complex64),
    "nan": lambda t: torch.full_like(t, float("nan")),
    "inf": lambda t: torch.full_like(t, float("inf")),
}


@pytest.mark.parametrize("bias", ["all", "lora_only"])
@pytest.mark.parametrize("bad", sorted(BAD_TENSORS))
def test_a_bad_tensor_leaves_the_base_model_bit_identical(bias: str, bad: str, tmp_path: Path) -> None:
    """The file's base biases come before its bad LoRA tensor in key order; neither reaches the model."""
    base = _llama_with_biases()
    model = grafting.get_peft_model(base, lora("llama", bias=bias, init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "lora_" in name:
                p.add_(0.5)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    assert any(k.endswith(".bias") for k in tensors)
    last = sorted(k for k in tensors if "lora_B" in k)[-1]
    tensors[last] = BAD_TENSORS[bad](tensors[last])
    save_file(tensors, tmp_path / WEIGHTS)
    fresh = _llama_with_biases()
    before = full_state(fresh)
    with pytest.raises(AdapterLoadError, match=last.replace(".", r"\.")):
        grafting.PeftModel.from_pretrained(fresh, tmp_path)
    assert_identical(full_state(fresh), before, "base after a failed from_pretrained")
    host = grafting.get_peft_model(_llama_with_biases(), lora("llama", target_modules=["k_proj"]), "host")
    before = full_state(host)
    with pytest.raises(AdapterLoadError):
        host.load_adapter(tmp_path, adapter_name="second")
    assert_identical(full_state(host), before, "model after a failed load_adapter")
    assert list(host.peft_config) == ["host"]


LORA_FIELDS = [
    ("use_rslora", "false"),
    ("use_dora", 1),
    ("fan_in_fan_out", "no"),
    ("lora_bias", None),
    ("r", 2**62),
    ("r", 4.0),
    ("r", True),
    ("lora_alpha", float("inf")),
    ("lora_alpha", float("nan")),
    ("lora_alpha", 1e300),
    ("lora_dropout", float("nan")),
    ("rank_pattern", {"q_proj(": 2}),
    ("alpha_pattern", {"q_proj": float("inf")}),
    ("rank_pattern", {"q_proj": 2**62}),
    ("bias", True),
]


@pytest.mark.parametrize(("field", "value"), LORA_FIELDS, ids=lambda v: repr(v)[:30])
def test_a_bad_config_value_is_a_config_error_naming_the_file_and_field(field: str, value: Any, tmp_path: Path) -> None:
    adapted("llama").save_pretrained(tmp_path)
    data = json.loads((tmp_path / CONFIG).read_text())
    data[field] = value
    (tmp_path / CONFIG).write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=field) as info:
        grafting.PeftModel.from_pretrained(base_model("llama"), tmp_path)
    assert str(tmp_path / CONFIG) in str(info.value)
