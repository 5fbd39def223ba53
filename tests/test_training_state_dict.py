"""``state_dict=`` in ``save_pretrained`` and ``get_peft_model_state_dict``: the adapter is taken from the given dict.

This is how a sharded model is saved (gather a full state dict on one rank, then save from it), so the
semantics are PEFT's: the dict is the whole model's, keyed as ``model.state_dict()``; the result is what
PEFT returns for the same adapter and the same dict (plugins/lora/tests/test_lora_state_dict.py compares random
LoRA adapters with PEFT's; here the toy methods of tests/toy_methods.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import grafting
from grafting.io.state_dict import get_peft_model_state_dict
from grafting.testing import assert_identical
from tests.helpers import base_model, files_under, randomize, toy
from tests.helpers import toy_adapted as adapted

pytestmark = pytest.mark.usefixtures("toy_methods")


def shifted(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Another value for every tensor of a state dict (so reading the model instead would show)."""
    return {k: v * 2 + 1 if v.is_floating_point() else v for k, v in state.items()}


def test_save_pretrained_writes_the_given_tensors(tmp_path: Path) -> None:
    model = adapted("llama", None, modules_to_save=["lm_head"])
    model.add_adapter("second", toy("llama", scale=0.2, target_modules=["k_proj"]))
    randomize(model, 5)
    given_state = shifted(model.state_dict())
    model.save_pretrained(tmp_path / "given", state_dict=given_state)
    model.save_pretrained(tmp_path / "own")
    for name, sub in (("default", ""), ("second", "second")):
        written = load_file(tmp_path / "given" / sub / "adapter_model.safetensors")
        assert_identical(written, get_peft_model_state_dict(model, given_state, adapter_name=name), msg=name)
        own = load_file(tmp_path / "own" / sub / "adapter_model.safetensors")
        assert sorted(own) == sorted(written)
        assert all(not torch.equal(own[k], written[k]) for k in own)


def test_a_state_dict_without_the_adapter_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    model = adapted("llama")
    partial = {k: v for k, v in model.state_dict().items() if "toy_d" not in k}
    with pytest.raises(grafting.StateDictKeyError, match=r"toy_d") as info:
        model.save_pretrained(tmp_path / "out", state_dict=partial)
    assert isinstance(info.value, KeyError)  # what PEFT's users catch for a missing key
    assert not (tmp_path / "out").exists()


def test_model_level_adapter_saves_from_the_model_with_a_state_dict(tmp_path: Path) -> None:
    """PEFT computes a prompt-learning adapter's saved embeddings from the model even when given a state dict."""
    config = grafting.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    model = grafting.get_peft_model(base_model("llama"), config)
    own = get_peft_model_state_dict(model)
    assert_identical(get_peft_model_state_dict(model, state_dict=shifted(model.state_dict())), own, msg="prompt")
    model.save_pretrained(tmp_path, state_dict=model.state_dict())
    assert files_under(tmp_path) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
