"""grafting-bnb: adapters on bitsandbytes layers train, load from PEFT, and merge through the codec hooks."""

from __future__ import annotations

import copy

import grafting_bnb.plugin
import peft
import pytest
import torch
from grafting_bnb import quantize_linears

import grafting
from grafting.errors import UnsupportedLayerError
from grafting.model.weights import dense_weight
from grafting.testing import assert_close, assert_identical, model_output, sample_inputs, tiny_llama

INPUTS = sample_inputs("llama")


@pytest.fixture(scope="module", params=[4, 8], ids=["nf4", "int8"])
def quantized(request: pytest.FixtureRequest) -> torch.nn.Module:
    # train mode: bitsandbytes' CPU 4-bit kernels differ slightly between train and eval
    return quantize_linears(tiny_llama(hidden=64), bits=request.param).train()


def small_random_adapters(model: torch.nn.Module) -> None:
    """Non-trivial adapters of a realistic size (|ΔW| well below |W|)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(
                    torch.randn_like(p) * (0.02 if "lora_B" in name else 0.2) + (1.0 if "magnitude" in name else 0.0)
                )


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_peft_adapter_on_quantized_model_gives_peft_logits(quantized, use_dora, tmp_path):
    config = peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, use_dora=use_dora)
    base = model_output(copy.deepcopy(quantized), INPUTS)  # on a copy: the int8 layers keep state
    reference = peft.get_peft_model(copy.deepcopy(quantized), config)
    reference.save_pretrained(tmp_path)
    ours = grafting.PeftModel.from_pretrained(copy.deepcopy(quantized), tmp_path).train()
    assert_close(model_output(ours, INPUTS), model_output(reference, INPUTS), changed_from=base, msg="PEFT's logits")


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merge_requantizes_base_plus_delta(quantized, use_dora):
    model = grafting.get_peft_model(
        copy.deepcopy(quantized), grafting.LoraConfig(r=4, target_modules="all-linear", use_dora=use_dora)
    )
    small_random_adapters(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    adapter = layer.adapters["default"]
    before = dense_weight(layer.base_layer).clone()
    expected = before + adapter.delta_matrix()
    if use_dora:
        expected = adapter.lora_magnitude_vector[:, None] * expected / expected.norm(dim=1, keepdim=True)
    unmerged = model_output(model, INPUTS)
    model.merge_adapter()
    after = dense_weight(layer.base_layer)
    assert not after.equal(before)
    tolerance = 0.15 if layer.base_layer.weight.dtype == torch.uint8 else 0.02  # NF4 vs int8 rounding
    assert (after - expected).norm() / expected.norm() < tolerance
    merged = model_output(model, INPUTS)
    effect = (unmerged - model_output(quantized, INPUTS)).abs().max()
    assert (merged - unmerged).abs().max() < 0.25 * effect  # requantization keeps the adapter's effect


def test_training_changes_adapters_only(quantized):
    model = grafting.get_peft_model(copy.deepcopy(quantized), grafting.LoraConfig(r=4, target_modules="all-linear"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(**INPUTS, labels=INPUTS["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = dict(model.named_parameters())
    assert_identical({n: after[n] for n in frozen}, frozen, msg="frozen parameters")
    assert any(not torch.equal(after[n], v) for n, v in trained.items())


def test_without_the_plugin_merging_a_quantized_layer_is_a_clear_error(quantized):
    model = grafting.get_peft_model(copy.deepcopy(quantized), grafting.LoraConfig(r=4, target_modules=["q_proj"]))
    small_random_adapters(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    registry = grafting.get_registry()
    registry.unregister(grafting_bnb.plugin)
    try:
        with pytest.raises(UnsupportedLayerError, match="grafting-bnb"):
            model.merge_adapter()
    finally:
        registry.register(grafting_bnb.plugin, name="bnb")
    assert_identical({n: p.detach() for n, p in model.named_parameters()}, weights, msg="after the refused merge")
    assert all(not layer.merged for _, layer in model.base_model.adapted_layers())
