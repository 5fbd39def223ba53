"""Issue 25's row 9 and its merge notes: a merge rounds once into the weight's dtype, ``safe_merge`` checks
``modules_to_save`` copies, and an unmerge after an in-place edit of the base weight is refused."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import grafting
from grafting.errors import MergeError
from grafting.testing import assert_identical
from tests.helpers import base_model

R = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
CONFIGS = {
    "lora": lambda: grafting.LoraConfig(**R, init_lora_weights=False),
    "dora": lambda: grafting.LoraConfig(**R, init_lora_weights=False, use_dora=True),
    "loha": lambda: grafting.LoHaConfig(**R, init_weights=False),
    "vera": lambda: grafting.get_peft_config({"peft_type": "VERA", **R, "init_weights": False}),
}


def half_ulps(merged: torch.Tensor, exact: torch.Tensor) -> float:
    """The largest error of ``merged`` against ``exact`` (float64), in units of the merged dtype's spacing."""
    rounded = exact.to(merged.dtype)
    up = torch.nextafter(rounded, torch.full_like(rounded, float("inf"))).double()
    down = torch.nextafter(rounded, torch.full_like(rounded, float("-inf"))).double()
    spacing = torch.maximum(up - rounded.double(), rounded.double() - down)  # the wider one at a power of two
    return float(((merged.double() - exact).abs() / spacing).max()) * 2


def exact_merge(adapter: Any, weight: torch.Tensor, method: str) -> torch.Tensor:
    """The merged weight computed in float64 from the same adapter."""
    wide = weight.double() + adapter.delta_matrix().double()
    if method == "dora":
        magnitude = adapter.lora_magnitude_vector.double()
        return magnitude[:, None] / torch.linalg.vector_norm(wide, dim=1)[:, None] * wide
    return wide


@pytest.mark.parametrize("method", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_row09_a_merge_rounds_once_into_the_weights_dtype(method: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = grafting.get_peft_model(base_model("llama").to(dtype), CONFIGS[method]())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "magnitude" not in name and not name.endswith("base_layer.weight") and p.requires_grad:
                p.normal_(0, 0.3)
    layers = dict(model.base_model.adapted_layers())
    before = {path: layer.base_layer.weight.detach().clone() for path, layer in layers.items()}
    model.merge_adapter()
    for path, layer in layers.items():
        exact = exact_merge(layer.adapters["default"], before[path], method)
        merged = layer.base_layer.weight.detach()
        assert merged.dtype == dtype
        # rounded once: at most half a spacing from the exact value (twice rounded reached 0.0069 for bf16 LoRA)
        assert half_ulps(merged, exact) <= 1.01, path


def test_row09_safe_merge_checks_modules_to_save_copies() -> None:
    model = grafting.get_peft_model(
        base_model("llama"), grafting.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    (wrapper,) = [w for _, w in model.base_model.save_wrappers()]
    with torch.no_grad():
        wrapper.modules_to_save["default"].weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MergeError, match=r"lm_head: the modules_to_save copy of adapter 'default' holds non-finite"):
        model.merge_and_unload(safe_merge=True)
    assert_identical(dict(model.state_dict()), before, "after a refused safe merge")


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_row09_unmerge_after_an_in_place_edit_of_the_base_weight_is_refused(method: str) -> None:
    config = {
        "lora": lambda: grafting.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
        "dora": lambda: grafting.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False, use_dora=True),
        "ia3": lambda: grafting.IA3Config(target_modules=["q_proj"], feedforward_modules=[], init_ia3_weights=False),
    }[method]()
    model = grafting.get_peft_model(base_model("llama"), config)
    model.merge_adapter()
    weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    with torch.no_grad():
        weight.data[0, 0] += 0.5  # an edit that bypasses autograd's version counter
    edited = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MergeError, match="base weights changed since"):
        model.unmerge_adapter()
    assert_identical(dict(model.state_dict()), edited, "after a refused unmerge")
    merged = grafting.get_peft_model(base_model("llama"), config)
    merged.merge_adapter()
    merged.unmerge_adapter()  # no edit: unmerges
    assert not any(layer.merged for _, layer in merged.base_model.adapted_layers())
