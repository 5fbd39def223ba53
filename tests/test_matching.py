"""Matching: which modules a config adapts, checked by rule on the four architectures, with the toy methods.

That LoRA adapts the same modules as PEFT is plugins/lora/tests/test_lora_matching.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import grafting
from grafting.errors import AdapterStateError, ConfigError, TargetNotFoundError, UnsupportedLayerError
from grafting.model.layer import AdaptedLayer
from grafting.model.matching import find_targets
from grafting.testing import assert_close, assert_identical
from tests.helpers import ARCHS, LINEAR, base_logits, base_model, logits, state_of, toy, toy_adapted
from tests.toy_methods import ToyDeltaConfig

pytestmark = pytest.mark.usefixtures("toy_methods")


def targets(model: nn.Module, **kwargs: Any) -> list[str]:
    return find_targets(model, ToyDeltaConfig(**kwargs))


def adapted_paths(model: nn.Module) -> set[str]:
    return {path for path, _ in model.base_model.adapted_layers()}


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
    assert "ToyDeltaConfig" in str(info.value)


def test_no_default_for_an_unknown_model_type() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TargetNotFoundError, match="target_modules is not set"):
        grafting.get_peft_model(model, ToyDeltaConfig())


# -- failures leave the model as it was ---------------------------------------------------------------------
def _snapshot(model: nn.Module) -> tuple[list[tuple[str, str]], dict[str, torch.Tensor]]:
    return [(n, type(m).__name__) for n, m in model.named_modules()], state_of(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_unsupported_layer_type(arch: str) -> None:
    norm = {"llama": "input_layernorm", "gpt2": "ln_1", "bert": "LayerNorm", "t5": "layer_norm"}[arch]
    model = base_model(arch)
    before = _snapshot(model)
    with pytest.raises(UnsupportedLayerError, match=norm):
        grafting.get_peft_model(model, toy(arch, target_modules=[LINEAR[arch][0], norm]))
    assert _snapshot(model)[0] == before[0]
    assert_identical(_snapshot(model)[1], before[1])
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "config", "error"),
    [
        ("second", toy("llama", target_modules=["nothing_here"]), TargetNotFoundError),
        ("second", toy("llama", target_modules=["q_proj", "model.norm"]), UnsupportedLayerError),
        ("default", toy("llama"), AdapterStateError),
        ("has.dot", toy("llama"), ConfigError),
        ("__base__", toy("llama"), ConfigError),
        ("/tmp/outside", toy("llama"), ConfigError),
    ],
)
def test_a_failing_add_adapter_leaves_the_model_unchanged(name: str, config: ToyDeltaConfig, error: type) -> None:
    model = toy_adapted("llama", target_modules=["q_proj", "o_proj"])
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
