"""IA3 and LoRA on one layer (a mixed model): forward and merge follow ARCHITECTURE.md's order.

Output scaling: ``y = l ⊙ (W x + b + ΔW x)``; input scaling: ``y = W (l ⊙ x) + b + ΔW x``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from ia3_helpers import Holder, base_weights, randomize
from torch import nn

from grafting import IA3Config, LoraConfig, MergeError, PeftModel, get_peft_model
from grafting.testing import assert_close, assert_identical, model_output, sample_inputs, tiny_llama

TARGETS = ["q_proj", "down_proj"]


def mixed_llama(seed: int) -> PeftModel:
    model = get_peft_model(
        tiny_llama(seed=seed),
        LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False),
        mixed=True,
    )
    model.add_adapter("ia3", IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"]))
    model.set_adapter(["default", "ia3"])
    randomize(model, seed, adapter="ia3")
    return model


def parts(model: PeftModel, path: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(W, b, ΔW, l) of one adapted layer, from the adapters' own parameters."""
    layer = model.get_base_model().get_submodule(path)
    lora = layer.adapters["default"]
    delta = lora.lora_B.weight @ lora.lora_A.weight * lora.scaling
    bias = layer.base_layer.bias
    return (
        layer.base_layer.weight.detach().clone(),
        None if bias is None else bias.detach().clone(),
        delta.detach(),
        layer.adapters["ia3"].ia3_l.detach().reshape(-1),
    )


def by_hand(w, b, delta, scale, x, feedforward: bool) -> torch.Tensor:
    bias = 0 if b is None else b
    if feedforward:
        return (x * scale) @ w.T + bias + x @ delta.T
    return scale * (x @ w.T + bias + x @ delta.T)


def merged_by_hand(w, b, delta, scale, feedforward: bool):
    if feedforward:
        return w * scale[None, :] + delta, b
    return scale[:, None] * (w + delta), None if b is None else scale * b


@given(seed=st.integers(0, 2**16))
def test_layers_compute_the_documented_order(seed: int) -> None:
    model = mixed_llama(seed)
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(seed))
    h = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(seed + 1))
    for path, inputs, feedforward in (
        ("model.layers.0.self_attn.q_proj", x, False),
        ("model.layers.1.mlp.down_proj", h, True),
    ):
        layer = model.get_base_model().get_submodule(path)
        w, b, delta, scale = parts(model, path)
        with torch.no_grad():
            plain = layer.base_layer(inputs)
            assert_close(layer(inputs), by_hand(w, b, delta, scale, inputs, feedforward), changed_from=plain, msg=path)


@given(seed=st.integers(0, 2**16))
def test_model_forward_and_merged_weights_match_the_hand_merged_model(seed: int) -> None:
    model = mixed_llama(seed)
    inputs = sample_inputs("llama", seed=seed)
    plain = tiny_llama(seed=seed)
    expected_weights = {}
    with torch.no_grad():
        for layer_index in range(2):
            for path, feedforward in (
                (f"model.layers.{layer_index}.self_attn.q_proj", False),
                (f"model.layers.{layer_index}.mlp.down_proj", True),
            ):
                weight, _ = merged_by_hand(*parts(model, path), feedforward)
                plain.get_submodule(path).weight.copy_(weight)
                expected_weights[path] = weight
    adapted = model_output(model, inputs)
    base = model_output(tiny_llama(seed=seed), inputs)
    assert_close(adapted, model_output(plain, inputs), changed_from=base, msg="the hand-merged model")
    original = base_weights(model.get_base_model())
    model.merge_adapter()
    for path, weight in expected_weights.items():
        merged = model.get_base_model().get_submodule(path).base_layer.weight
        assert_close(merged, weight, changed_from=original[f"{path}.weight"], msg=f"{path} merged")
    assert_close(model_output(model, inputs), adapted, changed_from=base, msg="merged")
    model.unmerge_adapter()
    assert_close(base_weights(model.get_base_model()), original, msg="unmerged weights")


@pytest.mark.parametrize("feedforward", [False, True])
def test_biased_layer_forward_and_merge(feedforward: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    nn.init.normal_(layer.bias)
    model = get_peft_model(
        Holder(copy.deepcopy(layer)), LoraConfig(r=2, target_modules=["layer"], init_lora_weights=False), mixed=True
    )
    model.add_adapter("ia3", IA3Config(target_modules=["layer"], feedforward_modules=["layer"] if feedforward else []))
    model.set_adapter(["default", "ia3"])
    randomize(model, 0, adapter="ia3")
    w, b, delta, scale = parts(model, "layer")
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert_close(model(x), by_hand(w, b, delta, scale, x, feedforward), changed_from=layer(x), msg="forward")
    model.merge_adapter()
    base = model.get_base_model().layer.base_layer
    weight, bias = merged_by_hand(w, b, delta, scale, feedforward)
    assert_close(base.weight, weight, changed_from=layer.weight, msg="merged weight")
    if feedforward:  # input scaling leaves the bias as it was
        assert_identical(base.bias, layer.bias, msg="merged bias")
    else:
        assert_close(base.bias, bias, changed_from=layer.bias, msg="merged bias")


def test_merging_lora_alone_under_an_active_input_scaling_is_refused() -> None:
    model = mixed_llama(1)
    inputs = sample_inputs("llama", seed=1)
    before = model_output(model, inputs)
    weights = base_weights(model.get_base_model())
    with pytest.raises(MergeError, match=r"down_proj.*'ia3'.*INPUT"):
        model.merge_adapter(["default"])
    assert_identical(base_weights(model.get_base_model()), weights, msg="after the refused merge")
    base = model_output(tiny_llama(seed=1), inputs)
    assert_close(model_output(model, inputs), before, changed_from=base, msg="after the refused merge")


def test_mixed_save_and_load_restores_both(tmp_path) -> None:
    model = mixed_llama(2)
    inputs = sample_inputs("llama", seed=2)
    expected = model_output(model, inputs)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "ia3" / "adapter_config.json").is_file()
    loaded = PeftModel.from_pretrained(tiny_llama(seed=2), tmp_path, mixed=True)
    assert sorted(loaded.active_adapters) == ["default", "ia3"]
    base = model_output(tiny_llama(seed=2), inputs)
    assert_close(model_output(loaded, inputs), expected, changed_from=base, msg="reloaded mix")
