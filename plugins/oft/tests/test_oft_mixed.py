"""OFT beside LoRA on the same layers (a mixed model), per-sample routing, and two input rotations on one layer."""

from __future__ import annotations

from typing import Any

import peft
import pytest
import torch
from oft_helpers import base, inputs, oft_params, output, randomize

from grafting import LoraConfig, MergeError, PeftModel, get_peft_model
from grafting.model.layer import AdaptedLayer
from grafting.testing import assert_close, model_output
from grafting_oft import OFTConfig

TIGHT = {"rtol": 1e-10, "atol": 1e-10}
SHARED = ["q_proj", "down_proj"]


def _mixed() -> Any:
    model = get_peft_model(
        base("llama"), OFTConfig(oft_block_size=4, target_modules=[*SHARED, "v_proj"], init_weights=False), mixed=True
    )
    model.add_adapter(
        "lora", LoraConfig(r=2, lora_alpha=4, target_modules=[*SHARED, "up_proj"], init_lora_weights=False)
    )
    model.set_adapter(["default", "lora"])
    randomize(model, 0)
    return model


def test_a_shared_layer_rotates_the_input_of_the_base_and_adds_lora_on_the_original_input() -> None:
    model = _mixed()
    layers = [m for m in model.modules() if isinstance(m, AdaptedLayer) and len(m.adapters) == 2]
    assert len(layers) == 2 * len(SHARED)
    for layer in layers:
        x = torch.randn(2, 3, layer.base_layer.in_features, dtype=torch.float64)
        rotation = layer.adapters["default"].oft_R.matrix().detach()
        with torch.no_grad():
            expected = layer.base_layer(x @ rotation) + x @ layer.adapters["lora"].delta_matrix().T
            assert_close(layer(x), expected, changed_from=layer.base_layer(x), **TIGHT)


def test_merging_both_keeps_the_output_and_unmerging_restores_it() -> None:
    model = _mixed()
    adapted = output(model, "llama")
    plain = output(base("llama"), "llama")
    merged = model.merge_and_unload()
    assert_close(output(merged, "llama"), adapted, changed_from=plain, **TIGHT)


def test_each_sample_gets_its_own_adapter() -> None:
    model = _mixed()
    batch = inputs("llama")
    routes = ["default", "lora"]
    routed = model_output(model, {**batch, "adapter_names": routes})
    for i, name in enumerate(routes):
        model.set_adapter(name)
        alone = model_output(model, batch)
        assert_close(routed[i], alone[i], msg=f"sample {i} routed to {name}")
    model.set_adapter(["default", "lora"])
    both = model_output(model, batch)
    assert (routed - both).abs().max() > 1e-3  # routing is not the mix


def test_the_mix_saves_and_loads_in_both_libraries(tmp_path) -> None:
    model = _mixed()
    expected = output(model, "llama")
    plain = output(base("llama"), "llama")
    model.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(base("llama"), tmp_path, mixed=True)
    assert oft_params(ours).keys() == oft_params(model).keys()
    assert_close(output(ours, "llama"), expected, changed_from=plain, **TIGHT, msg="grafting")
    # PEFT 0.21's PeftMixedModel.from_pretrained refuses OFT ("not supported for mixed models"): each folder loads there alone
    for name, folder in (("default", tmp_path), ("lora", tmp_path / "lora")):
        model.set_adapter(name)
        theirs = peft.PeftModel.from_pretrained(base("llama"), folder)
        assert_close(output(theirs, "llama"), output(model, "llama"), changed_from=plain, **TIGHT, msg=f"PEFT {name}")


def test_two_rotations_on_one_layer_merge_in_the_order_they_act() -> None:
    """Rotations do not commute: the one added last acts next to the weight, merges first, and alone."""
    model = get_peft_model(base("llama"), OFTConfig(oft_block_size=4, target_modules=["q_proj"], init_weights=False))
    model.add_adapter("second", OFTConfig(r=2, oft_block_size=0, target_modules=["q_proj"], init_weights=False))
    randomize(model, 1)
    model.base_model.set_adapter(["default", "second"])
    layer = next(m for m in model.modules() if isinstance(m, AdaptedLayer))
    x = torch.randn(4, 16, dtype=torch.float64)
    first, second = (layer.adapters[n].oft_R.matrix().detach() for n in ("default", "second"))
    with torch.no_grad():
        assert_close(layer(x), layer.base_layer(x @ first @ second), changed_from=layer.base_layer(x @ first), **TIGHT)
    adapted = output(model, "llama")
    with pytest.raises(MergeError, match="'second', added after it, stays active and unmerged"):
        model.merge_adapter(["default"])
    model.merge_adapter(["second"])  # next to the weight: may merge alone
    assert_close(output(model, "llama"), adapted, changed_from=output(base("llama"), "llama"), **TIGHT)
    model.merge_adapter(["default", "second"])
    assert_close(output(model, "llama"), adapted, changed_from=output(base("llama"), "llama"), **TIGHT)
