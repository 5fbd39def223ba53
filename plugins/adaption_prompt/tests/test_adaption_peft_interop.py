"""PEFT is the oracle: adaption prompts saved by either library load in the other with the same outputs."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from adaption_helpers import ARCHS, greedy, inputs, logits, open_gates, peft_adaption_prompt, prompt_parameters, tiny
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from grafting import AdaptionPromptConfig, PeftModel, get_peft_model
from grafting.testing import assert_close, model_output


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_saves_grafting_loads(arch: str, tmp_path) -> None:
    theirs = peft_adaption_prompt(tiny(arch, seed=1), adapter_len=3, adapter_layers=2)
    open_gates(theirs, seed=1)
    expected, expected_ids = logits(theirs, arch), greedy(theirs, arch)
    base = logits(tiny(arch, seed=1), arch)
    theirs.save_pretrained(tmp_path)

    ours = PeftModel.from_pretrained(tiny(arch, seed=1), tmp_path)
    assert_close(logits(ours, arch), expected, changed_from=base, msg="PEFT's prompts in grafting")
    assert torch.equal(greedy(ours, arch), expected_ids)  # token ids: exact


@pytest.mark.parametrize("arch", ARCHS)
def test_grafting_saves_peft_loads(arch: str, tmp_path) -> None:
    ours = get_peft_model(
        tiny(arch, seed=2), AdaptionPromptConfig(adapter_len=5, adapter_layers=2, task_type="CAUSAL_LM")
    )
    open_gates(ours, seed=2)
    expected, expected_ids = logits(ours, arch), greedy(ours, arch)
    ours.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(tiny(arch, seed=2), tmp_path)
    base = logits(tiny(arch, seed=2), arch)
    assert_close(logits(theirs, arch), expected, changed_from=base, msg="grafting's prompts in PEFT")
    assert torch.equal(greedy(theirs, arch), expected_ids)


def test_files_are_peft_files(tmp_path) -> None:
    """Same config content, tensor names and shapes as PEFT writes for the same options."""
    ours = get_peft_model(tiny("llama"), AdaptionPromptConfig(adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM"))
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft_adaption_prompt(tiny("llama"), adapter_len=4, adapter_layers=2)
    theirs.save_pretrained(tmp_path / "theirs")

    def config(folder: str) -> dict:
        data = json.loads((tmp_path / folder / "adapter_config.json").read_text())
        return {k: v for k, v in data.items() if k not in ("peft_version", "auto_mapping")}  # informational

    assert config("ours") == config("theirs")
    assert config("ours")["target_modules"] == "self_attn"
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "ours" / "adapter_model.safetensors").items()}
    reference = {k: tuple(v.shape) for k, v in load_file(tmp_path / "theirs" / "adapter_model.safetensors").items()}
    assert shapes == reference
    assert sorted(shapes) == [
        f"base_model.model.model.layers.{i}.self_attn.{name}"
        for i in (1, 2)
        for name in ("adaption_gate", "adaption_prompt")
    ]


@given(
    arch=st.sampled_from(ARCHS),
    adapter_len=st.integers(1, 4),
    adapter_layers=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_the_same_parameters_give_peft_outputs(arch: str, adapter_len: int, adapter_layers: int, seed: int) -> None:
    """PEFT's random prompts copied into grafting, gates opened at random: the same logits."""
    options = {"adapter_len": adapter_len, "adapter_layers": adapter_layers}
    theirs = peft_adaption_prompt(tiny(arch, seed=seed % 7), **options)
    ours = get_peft_model(tiny(arch, seed=seed % 7), AdaptionPromptConfig(task_type="CAUSAL_LM", **options))
    open_gates(theirs, seed=seed)
    mine = prompt_parameters(ours)
    with torch.no_grad():
        for name, p in prompt_parameters(theirs).items():
            path, leaf = name.rsplit(".", 1)
            mine[f"{path}.adapters.default.{leaf}"].copy_(p)
    batch = inputs(arch, batch=2, seed=seed)
    base = model_output(tiny(arch, seed=seed % 7), batch)
    assert_close(model_output(ours, batch), model_output(theirs, batch), changed_from=base, msg="PEFT's outputs")
