"""LoRA's matching against PEFT's: the same modules for the same config, its per-model-type defaults,
and a DoRA adapter that fails half-way. (The matching rules themselves are tests/test_matching.py, on toy methods.)"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lora_model_helpers import ARCHS, EMBEDDING, LINEAR, TASK_TYPES, adapted, base_model, lora, state_of
from torch import nn

import grafting
from grafting.errors import TargetNotFoundError, UnsupportedLayerError
from grafting.testing import assert_identical, tiny_model
from grafting_lora import LoraConfig


def adapted_paths(model: nn.Module) -> set[str]:
    return {path for path, _ in model.base_model.adapted_layers()}


def peft_adapted_paths(arch: str, config: LoraConfig) -> set[str] | None:
    """The modules PEFT puts LoRA on for the same config, or None if PEFT refuses (no match)."""
    import peft
    from peft.tuners.lora import LoraLayer

    data = config.to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = peft.get_peft_model(base_model(arch), peft.get_peft_config(data))
        except ValueError as exc:
            message = str(exc).lower()
            if "not found in the base model" in message or "no modules were targeted" in message:
                return None
            raise
    prefix = "base_model.model."
    return {n[len(prefix) :] for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def grafting_adapted_paths(arch: str, config: LoraConfig) -> set[str] | None:
    try:
        return adapted_paths(grafting.get_peft_model(base_model(arch), config))
    except TargetNotFoundError:
        return None


def test_defaults_follow_the_model_type() -> None:
    for arch, expected in {"llama": "q_proj", "gpt2": "c_attn", "bert": "query", "t5": "q"}.items():
        model = grafting.get_peft_model(tiny_model(arch), LoraConfig())
        assert any(p.endswith("." + expected) for p in adapted_paths(model)), arch


# -- against PEFT -------------------------------------------------------------------------------------
@st.composite
def target_specs(draw: Any, arch: str) -> dict[str, Any]:
    leaves = [*LINEAR[arch], EMBEDDING[arch]]
    chosen = draw(st.lists(st.sampled_from(leaves), min_size=1, unique=True))
    regexes = [r".*\.(" + "|".join(chosen) + ")"]
    if arch == "llama":
        regexes.append(r"model\.layers\.0\..*proj")
    target = draw(st.lists(st.sampled_from(leaves), min_size=1, max_size=4, unique=True) | st.sampled_from(regexes))
    if draw(st.booleans()):
        target = "all-linear"
    spec: dict[str, Any] = {"target_modules": target, "task_type": TASK_TYPES[arch], "fan_in_fan_out": arch == "gpt2"}
    if draw(st.booleans()):
        spec["exclude_modules"] = draw(
            st.lists(st.sampled_from(leaves), min_size=1, max_size=2, unique=True) | st.just(r".*\.(0|1)\." + leaves[0])
        )
    if not isinstance(target, str) and draw(st.booleans()):
        spec["layers_to_transform"] = draw(st.lists(st.integers(0, 2), min_size=1, max_size=2, unique=True))
        spec["layers_pattern"] = draw(
            st.sampled_from([None, {"llama": "layers", "gpt2": "h", "bert": "layer", "t5": "block"}[arch]])
        )
    return spec


@pytest.mark.parametrize("arch", ARCHS)
@given(data=st.data())
def test_same_modules_as_peft(arch: str, data: st.DataObject) -> None:
    spec = data.draw(target_specs(arch))
    config = LoraConfig(**spec)
    ours = grafting_adapted_paths(arch, config)
    assert ours == peft_adapted_paths(arch, config)


class Stages(nn.Module):
    """A model with layers in an unusual container and a nested numbered list, as PEFT sees it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.body = nn.Module()
        self.body.stages = nn.ModuleList(nn.ModuleDict({"fc": nn.Linear(4, 4)}) for _ in range(3))
        self.body.stages[1]["experts"] = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for stage in self.body.stages:
            h = stage["fc"](h)
            if "experts" in stage:
                h = sum(e(h) for e in stage["experts"])
        return self.head(h)


@pytest.mark.parametrize(
    "spec",
    [
        {"target_modules": ["fc"], "layers_to_transform": [1]},
        {"target_modules": ["fc", "experts.0"], "layers_to_transform": [0, 1]},
        {"target_modules": ["experts.2"], "layers_to_transform": [1], "layers_pattern": "stages"},
        {"target_modules": ["fc", "2"], "layers_to_transform": [2], "layers_pattern": ["stages"]},
    ],
)
def test_layer_indices_on_a_custom_model_as_peft(spec: dict[str, Any]) -> None:
    import peft
    from peft.tuners.lora import LoraLayer

    config = LoraConfig(**spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(Stages(), peft.get_peft_config(config.to_dict()))
    expected = {n[len("base_model.model.") :] for n, m in theirs.named_modules() if isinstance(m, LoraLayer)}
    assert expected, "the example must target something"
    assert adapted_paths(grafting.get_peft_model(Stages(), config)) == expected


def _snapshot(model: nn.Module) -> tuple[list[tuple[str, str]], dict[str, torch.Tensor]]:
    return [(n, type(m).__name__) for n, m in model.named_modules()], state_of(model)


def test_a_failing_dora_adapter_changes_nothing() -> None:
    model = adapted("llama")
    before = _snapshot(model)
    with pytest.raises(UnsupportedLayerError, match="norm"):  # DoRA on v_proj and the embedding, then a norm layer
        model.add_adapter("dora", lora("llama", target_modules=["v_proj", "embed_tokens", "model.norm"], use_dora=True))
    assert _snapshot(model)[0] == before[0]
    assert_identical(_snapshot(model)[1], before[1])
    assert list(model.peft_config) == ["default"]
    assert model.active_adapters == ["default"]
