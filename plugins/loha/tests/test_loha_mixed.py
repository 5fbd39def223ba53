"""LoHa beside LoRA on the same layers (a mixed model): the layer adds both deltas."""

from __future__ import annotations

from typing import Any

import peft
import pytest
import torch
from loha_helpers import F64, base, hada_params, output, randomize, weights_of

from grafting import LoraConfig, PeftModel, get_peft_model
from grafting.model.layer import AdaptedLayer
from grafting.testing import assert_close
from grafting_loha import LoHaConfig

SHARED = {"llama": ["q_proj", "down_proj"], "conv": ["conv_a", "seq"]}
LORA_ONLY = {"llama": ["v_proj"], "conv": ["conv_b"]}
LOHA_ONLY = {"llama": ["up_proj"], "conv": ["conv_c"]}


def _mixed(arch: str, seed: int = 0) -> Any:
    model = get_peft_model(
        base(arch),
        LoraConfig(r=2, lora_alpha=4, target_modules=SHARED[arch] + LORA_ONLY[arch], init_lora_weights=False),
        mixed=True,
    )
    model.add_adapter(
        "loha",
        LoHaConfig(r=2, alpha=3, target_modules=SHARED[arch] + LOHA_ONLY[arch], init_weights=False),
    )
    model.set_adapter(["default", "loha"])
    randomize(model, seed, adapter="loha")
    return model


def _lora_delta(layer: AdaptedLayer) -> torch.Tensor:
    return layer.adapters["default"].delta_matrix()


def _loha_delta(layer: AdaptedLayer) -> torch.Tensor:
    adapter = layer.adapters["loha"]
    l1, r1, l2, r2 = (p.detach() for p in adapter.factors())
    return (l1 @ r1) * (l2 @ r2) * adapter.scaling


def _apply(layer: torch.nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    weight = weight.reshape(layer.weight.shape)
    if isinstance(layer, torch.nn.Linear):
        return torch.nn.functional.linear(x, weight)
    conv = torch.nn.functional.conv1d if isinstance(layer, torch.nn.Conv1d) else torch.nn.functional.conv2d
    return conv(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)


def _sample(layer: torch.nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(9)
    if isinstance(layer, torch.nn.Linear):
        shape: tuple[int, ...] = (2, 3, layer.in_features)
    elif isinstance(layer, torch.nn.Conv1d):
        shape = (2, layer.in_channels, 7)
    else:
        shape = (2, layer.in_channels, 6, 6)
    return torch.randn(shape, generator=gen, dtype=F64)


@pytest.mark.parametrize("arch", ["llama", "conv"])
def test_a_shared_layer_adds_the_lora_and_the_loha_delta(arch: str) -> None:
    model = _mixed(arch)
    shared = [(name, m) for name, m in model.named_modules() if isinstance(m, AdaptedLayer) and len(m.adapters) == 2]
    assert {name.rsplit(".", 1)[-1] for name, _ in shared} == set(SHARED[arch])
    for name, layer in shared:
        x = _sample(layer.base_layer)
        with torch.no_grad():
            base_out = layer.base_layer(x)
            lora = _apply(layer.base_layer, _lora_delta(layer), x)
            loha = _apply(layer.base_layer, _loha_delta(layer), x)
            assert lora.abs().max() > 1e-3
            assert loha.abs().max() > 1e-3
            assert_close(layer(x), base_out + lora + loha, changed_from=base_out, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("arch", ["llama", "conv"])
def test_merging_both_folds_the_sum_of_the_deltas_into_the_weight(arch: str) -> None:
    model = _mixed(arch)
    adapted = output(model, arch)
    layers = {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, AdaptedLayer)}
    expected = {}
    for name, layer in layers.items():
        delta = torch.zeros_like(layer.base_layer.weight.flatten(1))
        if "default" in layer.adapters:
            delta = delta + _lora_delta(layer)
        if "loha" in layer.adapters:
            delta = delta + _loha_delta(layer)
        expected[f"{name}.weight"] = layer.base_layer.weight.detach() + delta.reshape(layer.base_layer.weight.shape)
    plain = model.merge_and_unload()
    merged = weights_of(plain)
    for key, value in expected.items():
        assert_close(merged[key], value, rtol=1e-12, atol=1e-12, msg=key)
    assert_close(output(plain, arch), adapted, changed_from=output(base(arch), arch), rtol=1e-10, atol=1e-10)


def test_the_mix_saves_and_loads_in_both_libraries(tmp_path) -> None:
    model = _mixed("llama")
    expected = output(model, "llama")
    model.save_pretrained(tmp_path)

    ours = PeftModel.from_pretrained(base("llama"), tmp_path, mixed=True)
    assert sorted(ours.active_adapters) == ["default", "loha"]
    assert hada_params(ours).keys() == hada_params(model).keys()
    plain = output(base("llama"), "llama")
    assert_close(output(ours, "llama"), expected, changed_from=plain, rtol=1e-10, atol=1e-10, msg="grafting")

    theirs = peft.PeftMixedModel.from_pretrained(base("llama"), tmp_path, adapter_name="default")
    theirs.load_adapter(tmp_path / "loha", adapter_name="loha")
    theirs.set_adapter(["default", "loha"])
    theirs.eval()
    assert_close(output(theirs, "llama"), expected, changed_from=plain, rtol=1e-10, atol=1e-10, msg="PEFT")
