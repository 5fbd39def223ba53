"""Matching: which modules a config adapts, checked by rule and against PEFT on the four architectures."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import grafting
from grafting.errors import AdapterStateError, ConfigError, TargetNotFoundError, UnsupportedLayerError
from grafting.model.layer import AdaptedLayer
from grafting.model.matching import find_targets
from grafting.testing import assert_close, assert_identical
from grafting_lora import LoraConfig
from tests.helpers import (
    ARCHS,
    EMBEDDING,
    LINEAR,
    TASK_TYPES,
    adapted,
    base_logits,
    base_model,
    logits,
    lora,
    state_of,
)


def targets(model: nn.Module, **kwargs: Any) -> list[str]:
    return find_targets(model, LoraConfig(**kwargs))


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


# -- the rules ---------------------------------------------------------------------------------------
def test_list_entries_match_exactly_or_as_dotted_suffix() -> None:
    model = base_model("llama")
    assert targets(model, target_modules=["q_proj"]) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert targets(model, target_modules=["self_attn.q_proj"]) == targets(model, target_modules=["q_proj"])
    assert targets(model, target_modules=["model.layers.1.mlp.up_proj"]) == ["model.layers.1.mlp.up_proj"]
    assert targets(model, target_modules=["layers.0.self_attn.v_proj", "down_proj"]) == [
        "model.layers.0.self_attn.v_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]
    with pytest.raises(TargetNotFoundError):  # "proj" is not a dotted suffix of "q_proj"
        targets(model, target_modules=["proj"])


def test_a_string_is_a_full_match_regex() -> None:
    model = base_model("llama")
    with pytest.raises(TargetNotFoundError):
        targets(model, target_modules="q_proj")  # does not match the whole name
    assert targets(model, target_modules=r".*\.q_proj") == targets(model, target_modules=["q_proj"])
    assert targets(model, target_modules=r"model\.layers\.1\.mlp\.(up|down)_proj") == [
        "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj",
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_all_linear_is_every_linear_layer_but_the_output_head(arch: str) -> None:
    from transformers.pytorch_utils import Conv1D

    model = base_model(arch)
    found = targets(model, target_modules="all-linear")
    linear = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    head = {n for n, m in model.named_modules() if m is model.get_output_embeddings()}
    assert found == [n for n in linear if n not in head]
    assert "lm_head" not in found
    assert targets(model, target_modules=["all-linear"]) == found


def test_exclude_modules() -> None:
    model = base_model("llama")
    found = targets(model, target_modules="all-linear", exclude_modules=["mlp.up_proj", "q_proj"])
    assert not any(n.endswith(("up_proj", "q_proj")) for n in found)
    assert "model.layers.0.mlp.down_proj" in found
    found = targets(model, target_modules=["q_proj", "k_proj"], exclude_modules=r".*layers\.0\..*")
    assert found == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]


@pytest.mark.parametrize(
    ("arch", "target", "pattern", "expected"),
    [
        ("llama", "q_proj", None, ["model.layers.1.self_attn.q_proj"]),
        ("llama", "q_proj", "layers", ["model.layers.1.self_attn.q_proj"]),
        ("gpt2", "c_attn", "h", ["transformer.h.1.attn.c_attn"]),
        ("bert", "query", None, ["bert.encoder.layer.1.attention.self.query"]),
        (
            "t5",
            "q",
            "block",
            [
                "encoder.block.1.layer.0.SelfAttention.q",
                "decoder.block.1.layer.0.SelfAttention.q",
                "decoder.block.1.layer.1.EncDecAttention.q",
            ],
        ),
    ],
)
def test_layers_to_transform(arch: str, target: str, pattern: str | None, expected: list[str]) -> None:
    model = base_model(arch)
    assert targets(model, target_modules=[target], layers_to_transform=[1], layers_pattern=pattern) == expected
    with pytest.raises(TargetNotFoundError):
        targets(model, target_modules=[target], layers_to_transform=[5])
    with pytest.raises(TargetNotFoundError):
        targets(model, target_modules=[target], layers_to_transform=[1], layers_pattern="nothing_like_this")


def test_no_match_lists_close_names() -> None:
    with pytest.raises(TargetNotFoundError, match=r"q_prj.*closest module names.*q_proj") as info:
        targets(base_model("llama"), target_modules=["q_prj"])
    assert "LoraConfig" in str(info.value)


def test_defaults_follow_the_model_type() -> None:
    from grafting.testing import tiny_model

    for arch, expected in {"llama": "q_proj", "gpt2": "c_attn", "bert": "query", "t5": "q"}.items():
        model = grafting.get_peft_model(tiny_model(arch), LoraConfig())
        assert any(p.endswith("." + expected) for p in adapted_paths(model)), arch


def test_no_default_for_an_unknown_model_type() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TargetNotFoundError, match="target_modules is not set"):
        grafting.get_peft_model(model, LoraConfig())


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
    assert set(find_targets(Stages(), config)) == expected


# -- failures leave the model as it was ---------------------------------------------------------------------
def _snapshot(model: nn.Module) -> tuple[list[tuple[str, str]], dict[str, torch.Tensor]]:
    return [(n, type(m).__name__) for n, m in model.named_modules()], state_of(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_unsupported_layer_type(arch: str) -> None:
    norm = {"llama": "input_layernorm", "gpt2": "ln_1", "bert": "LayerNorm", "t5": "layer_norm"}[arch]
    model = base_model(arch)
    before = _snapshot(model)
    with pytest.raises(UnsupportedLayerError, match=norm):
        grafting.get_peft_model(model, lora(arch, target_modules=[LINEAR[arch][0], norm]))
    assert _snapshot(model)[0] == before[0]
    assert_identical(_snapshot(model)[1], before[1])
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_a_failing_dora_adapter_changes_nothing() -> None:
    model = adapted("llama")
    before = _snapshot(model)
    with pytest.raises(UnsupportedLayerError, match="norm"):  # DoRA on v_proj and the embedding, then a norm layer
        model.add_adapter("dora", lora("llama", target_modules=["v_proj", "embed_tokens", "model.norm"], use_dora=True))
    assert _snapshot(model)[0] == before[0]
    assert_identical(_snapshot(model)[1], before[1])
    assert list(model.peft_config) == ["default"]
    assert model.active_adapters == ["default"]


@pytest.mark.parametrize(
    ("name", "config", "error"),
    [
        ("second", lora("llama", target_modules=["nothing_here"]), TargetNotFoundError),
        ("second", lora("llama", target_modules=["q_proj", "model.norm"]), UnsupportedLayerError),
        ("default", lora("llama"), AdapterStateError),
        ("has.dot", lora("llama"), ConfigError),
        ("__base__", lora("llama"), ConfigError),
        ("/tmp/outside", lora("llama"), ConfigError),
    ],
)
def test_a_failing_add_adapter_leaves_the_model_unchanged(name: str, config: LoraConfig, error: type) -> None:
    model = adapted("llama", target_modules=["q_proj", "o_proj"])
    out = logits(model, "llama")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    before = _snapshot(model)
    with pytest.raises(error):
        model.add_adapter(name, config)
    assert _snapshot(model)[0] == before[0]
    assert_identical(_snapshot(model)[1], before[1])
    assert list(model.peft_config) == ["default"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable
    assert_close(logits(model, "llama"), out, changed_from=base_logits("llama"), msg="after the failed add_adapter")
