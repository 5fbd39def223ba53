"""PEFT's per-adapter attributes on adapted layers (``layer.lora_A["default"]``), against PEFT's own layers.

PEFT users read and write an adapter's tensors through its tuner layer's dicts; grafting's adapted layer
answers the same names with read-only views over the adapters themselves (grafting.attribute_view).
"""

from __future__ import annotations

import warnings
from typing import Any

import peft
import pytest
import torch
from torch import nn

import grafting
from grafting.testing import assert_close, assert_identical
from tests.helpers import base_model, logits, peft_config

#: (method, grafting config, the PEFT attributes grafting declares for it).
LORA_NAMES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_dropout")
CASES: dict[str, tuple[Any, tuple[str, ...]]] = {
    "lora": (
        grafting.LoraConfig(
            r=4, target_modules=["q_proj", "v_proj", "embed_tokens"], lora_dropout=0.1, init_lora_weights=False
        ),
        (*LORA_NAMES, "scaling", "r"),
    ),
    "dora": (
        grafting.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=True, init_lora_weights=False),
        (*LORA_NAMES, "scaling", "r", "use_dora"),
    ),
    "loha": (
        grafting.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False),
        ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "r", "scaling"),
    ),
    "ia3": (
        grafting.IA3Config(
            target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
        ),
        ("ia3_l",),
    ),
    "vera": (
        grafting.VeraConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False),
        ("vera_lambda_b", "vera_lambda_d", "vera_dropout"),
    ),
}


def both(config: Any, tmp_path: Any) -> tuple[Any, Any]:
    """PEFT's model with ``config`` (two adapters), and grafting's loaded from PEFT's saved folders."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base_model("llama"), peft_config(config))
        theirs.add_adapter("other", peft_config(config))
        theirs.save_pretrained(tmp_path)
    ours = grafting.PeftModel.from_pretrained(base_model("llama"), tmp_path)
    ours.load_adapter(tmp_path / "other", "other")
    return theirs, ours


def same_value(actual: Any, expected: Any, where: str) -> None:
    if isinstance(expected, nn.Dropout | nn.Identity):
        assert type(actual) is type(expected), where
        assert getattr(actual, "p", None) == getattr(expected, "p", None), where
    elif isinstance(expected, nn.Module) and hasattr(expected, "weight") and not isinstance(actual, nn.Module):
        assert_identical(actual, expected.weight, where)  # DoRA's vector: PEFT's module holds it as .weight
    elif isinstance(expected, nn.Module):
        assert_identical(dict(actual.state_dict()), dict(expected.state_dict()), where)
    elif isinstance(expected, torch.Tensor):
        assert_identical(actual, expected, where)
    else:
        assert actual == pytest.approx(expected), where


@pytest.mark.parametrize("method", list(CASES))
def test_adapted_layers_answer_peft_attributes_with_peft_keys_and_values(method: str, tmp_path: Any) -> None:
    config, names = CASES[method]
    theirs, ours = both(config, tmp_path)
    checked = 0
    for path, module in theirs.base_model.model.named_modules():
        if not isinstance(module, peft.tuners.tuners_utils.BaseTunerLayer):
            continue
        layer = ours.base_model.model.get_submodule(path)
        assert isinstance(layer, grafting.AdaptedLayer), path
        for name in names:
            if name == "lora_dropout" and isinstance(module, peft.tuners.lora.Embedding):
                continue  # PEFT keeps a dropout it never applies on embeddings; grafting's has none
            expected = getattr(module, name)
            view = getattr(layer, name)
            assert sorted(view.keys()) == sorted(expected.keys()), f"{path}.{name}"
            for adapter_name in expected:
                same_value(view[adapter_name], expected[adapter_name], f"{path}.{name}[{adapter_name!r}]")
                checked += 1
    assert checked > 0


@pytest.mark.parametrize("method", list(CASES))
def test_attribute_entries_are_the_adapters_own_objects(method: str) -> None:
    config, names = CASES[method]
    model = grafting.get_peft_model(base_model("llama"), config)
    layer = next(m for m in model.modules() if isinstance(m, grafting.AdaptedLayer))
    for name in names:
        for adapter_name, value in getattr(layer, name).items():
            assert value is getattr(layer.adapters[adapter_name], name)


def test_an_in_place_write_through_lora_A_reaches_the_trained_module() -> None:
    model = grafting.get_peft_model(base_model("llama"), CASES["lora"][0])
    model.eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    before = logits(model, "llama")
    weight = layer.lora_A["default"].weight
    assert weight.requires_grad
    assert any(weight is p for p in model.parameters())
    with torch.no_grad():
        layer.lora_A["default"].weight.mul_(16.0)  # a power of two: dividing back is exact
    scaled = logits(model, "llama")
    with torch.no_grad():
        layer.adapters["default"].lora_A.weight.div_(16.0)
    # back where it was: the write went to the adapter itself
    assert_close(logits(model, "llama"), before, changed_from=scaled)
    with torch.no_grad():
        layer.lora_B.default.weight.zero_()  # ModuleDict-style attribute access, as PEFT's
    assert not torch.equal(logits(model, "llama"), before)


def test_views_list_adapters_refuse_unknown_names_and_writes() -> None:
    model = grafting.get_peft_model(base_model("llama"), CASES["lora"][0])
    model.add_adapter("second", grafting.LoraConfig(r=2, target_modules=["q_proj"]))
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    v_proj = model.base_model.model.model.layers[0].self_attn.v_proj
    assert list(q_proj.lora_A.keys()) == ["default", "second"]
    assert list(v_proj.lora_A.keys()) == ["default"]
    assert q_proj.r == {"default": 4, "second": 2}
    assert q_proj.scaling == {"default": 2.0, "second": 4.0}
    assert dict(q_proj.lora_magnitude_vector) == {}  # PEFT has the dict on every LoRA layer, empty without DoRA
    with pytest.raises(KeyError, match="nope"):
        q_proj.lora_A["nope"]
    with pytest.raises(AttributeError):
        _ = q_proj.hada_w1_a  # no LoHa adapter on this layer
    with pytest.raises(AttributeError):
        _ = q_proj.lora_A.nope
    with pytest.raises(TypeError):
        q_proj.lora_A["third"] = nn.Linear(2, 2)  # type: ignore[index]
    model.delete_adapter("second")
    assert list(q_proj.lora_A.keys()) == ["default"]  # a live view
    assert q_proj.in_features == 16  # the base layer's attributes still answer


PREFIX_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("LoraConfig", {"r": 2, "target_modules": ["q_proj"]}),
    "loha": ("LoHaConfig", {"r": 2, "target_modules": ["q_proj"]}),
    "ia3": ("IA3Config", {"target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
    "vera": ("VeraConfig", {"r": 2, "target_modules": ["q_proj", "v_proj"]}),
}


@pytest.mark.parametrize("method", list(PREFIX_CONFIGS))
def test_model_prefix_is_peft_s_and_picks_the_same_parameters(method: str) -> None:
    name, options = PREFIX_CONFIGS[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base_model("llama"), getattr(peft, name)(**options))
    ours = grafting.get_peft_model(base_model("llama"), getattr(grafting, name)(**options))
    assert ours.prefix == theirs.prefix

    def picked(model: Any) -> int:  # PEFT users' idiom: the adapter's parameters by name
        return sum(p.numel() for n, p in model.named_parameters() if model.prefix in n)

    assert picked(ours) == picked(theirs) > 0


def test_prompt_learning_models_have_no_prefix_as_in_peft() -> None:
    config = {"task_type": "CAUSAL_LM", "num_virtual_tokens": 2}
    theirs = peft.get_peft_model(base_model("llama"), peft.PromptTuningConfig(**config))
    ours = grafting.get_peft_model(base_model("llama"), grafting.PromptTuningConfig(**config))
    with pytest.raises(AttributeError):
        _ = theirs.prefix
    with pytest.raises(AttributeError):
        _ = ours.prefix
