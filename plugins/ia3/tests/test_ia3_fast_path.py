"""IA3's fused layer (the vector folded into the weight) against the plain composition, values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from ia3_helpers import Holder, randomize
from torch import nn
from transformers.pytorch_utils import Conv1D

import grafting
from grafting import ConfigError, IA3Config, LoraConfig, get_peft_model
from grafting.model.layer import AdaptedLayer
from grafting.testing import tiny_llama
from grafting_ia3.layers import IA3Input, IA3Output

HALF = [torch.bfloat16, torch.float16]
KINDS = ["linear", "linear-nobias", "conv1d", "linear-trainbias"]


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def _tolerance(dtype: torch.dtype) -> float:
    """Norm-relative error of a few roundings in ``dtype``; float32/float64 take no fused path: exact."""
    return 2 * torch.finfo(dtype).eps if dtype in HALF else 0.0


def _layer(kind: str, dtype: torch.dtype, scales_input: bool) -> AdaptedLayer:
    torch.manual_seed(0)
    base: nn.Module = nn.Linear(24, 20, bias=kind != "linear-nobias") if kind != "conv1d" else Conv1D(20, 24)
    if kind == "conv1d":
        nn.init.normal_(base.weight, std=0.2)
    if getattr(base, "bias", None) is not None:
        nn.init.normal_(base.bias)
    base.requires_grad_(False)
    if kind == "linear-trainbias":  # a trained base bias: its gradient comes from the fused node
        base.bias.requires_grad_(True)
    layer = AdaptedLayer(base.to(dtype))
    adapter = (IA3Input if scales_input else IA3Output)(base, init=False)
    if dtype == torch.float64:
        adapter.double()
    layer.add_adapter("a", adapter)
    layer.set_active(["a"])
    return layer


def _run(layer: AdaptedLayer, x: torch.Tensor, fused: bool) -> tuple[torch.Tensor, dict, str]:
    layer.adapters["a"].fused = fused
    x = x.detach().requires_grad_(True)
    y = layer(x)
    node = type(y.grad_fn).__name__
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    (y * upstream).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    grads["x"] = x.grad.clone()
    layer.zero_grad(set_to_none=True)
    return y.detach(), grads, node


@pytest.mark.parametrize("dtype", [*HALF, torch.float32, torch.float64])
@pytest.mark.parametrize("scales_input", [True, False], ids=["input", "output"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(3, 5), (40,)], ids=["tokens<in", "tokens>in"])
def test_the_fused_layer_agrees_with_the_reference(
    kind: str, scales_input: bool, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    """Values and gradients (input, ia3_l, trained bias) of the fused layer equal the plain composition's."""
    layer = _layer(kind, dtype, scales_input)
    x = torch.randn(*shape, 24, generator=torch.Generator().manual_seed(2)).to(dtype)
    y_ref, g_ref, _ = _run(layer, x, fused=False)
    y, g, node = _run(layer, x, fused=True)
    assert ("IA3" in node) == (dtype in HALF), f"the fused node is taken in half precision only, got {node}"
    assert y.dtype == y_ref.dtype == dtype
    with torch.no_grad():
        moved = _relative(layer.base_layer(x), y_ref)
    assert moved > 0.1, "the adapter must move the output far more than the tolerance"
    tol = _tolerance(dtype)
    assert _relative(y, y_ref) <= tol
    assert g.keys() == g_ref.keys()
    assert {"x", "adapters.a.ia3_l"} <= g.keys()
    assert ("base_layer.bias" in g) == (kind == "linear-trainbias")
    for name, grad in g.items():
        assert grad.dtype == g_ref[name].dtype, name
        assert grad.shape == g_ref[name].shape, name
        assert _relative(grad, g_ref[name]) <= 2 * tol, name


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("scales_input", [True, False], ids=["input", "output"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_inference_folds_the_vector_without_an_autograd_node(kind: str, scales_input: bool, dtype: torch.dtype) -> None:
    layer = _layer(kind, dtype, scales_input)
    x = torch.randn(4, 24, generator=torch.Generator().manual_seed(5)).to(dtype)
    layer.adapters["a"].fused = False
    with torch.no_grad():
        expected = layer(x)
        layer.adapters["a"].fused = True
        actual = layer(x)
    assert actual.dtype == dtype
    assert _relative(actual, expected) <= _tolerance(dtype)
    assert _relative(layer.base_layer(x), expected) > 0.1


@pytest.mark.parametrize("dtype", HALF)
def test_precision_adapter_is_peft_numerics_and_input_agrees_within_rounding(dtype: torch.dtype) -> None:
    """``precision="adapter"`` scales in float32 as PEFT does (no fused layer); the default agrees within rounding."""
    layer = _layer("linear", dtype, scales_input=True)
    adapter = layer.adapters["a"]
    x = torch.randn(6, 24, generator=torch.Generator().manual_seed(3)).to(dtype)
    vector = adapter.ia3_l.detach().reshape(-1)
    with torch.no_grad():
        peft_way = layer.base_layer((x.float() * vector).to(dtype))  # float32 product, rounded once
        adapter.precision = "adapter"
        exact = layer(x)
        adapter.precision = "input"
        fast = layer(x)
    assert torch.equal(exact, peft_way)
    assert _relative(fast, exact) <= _tolerance(dtype)
    adapter.precision = "fast"  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="precision"):
        layer(x)


def test_precision_is_a_config_option_written_only_when_set() -> None:
    assert "precision" not in IA3Config(target_modules=["q"], feedforward_modules=[]).to_dict()
    config = IA3Config(target_modules=["q"], feedforward_modules=[], precision="adapter")
    assert config.to_dict()["precision"] == "adapter"
    with pytest.raises(ConfigError, match="precision"):
        IA3Config(target_modules=["q"], feedforward_modules=[], precision="float32")
    model = get_peft_model(
        Holder(nn.Linear(4, 4)), IA3Config(target_modules=["layer"], feedforward_modules=[], precision="adapter")
    )
    assert model.base_model.model.layer.adapters["default"].precision == "adapter"


def _llama(dtype: torch.dtype, seed: int, **options: object) -> grafting.PeftModel:
    model = get_peft_model(
        tiny_llama(hidden=32, seed=seed).to(dtype),
        IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], **options),
    )
    randomize(model, seed)
    return model


def _set_fused(model: nn.Module, fused: bool) -> None:
    for module in model.modules():
        if isinstance(module, (IA3Input, IA3Output)):
            module.fused = fused


def _loss_and_grads(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@given(seed=st.integers(0, 2**16))
def test_a_bf16_model_trains_the_same_fused_or_not(seed: int) -> None:
    """A whole tiny Llama in bf16 (float32 vectors): the loss and every ia3_l gradient agree with the reference."""
    model = _llama(torch.bfloat16, seed)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(seed))
    _set_fused(model, False)
    loss_ref, grads_ref = _loss_and_grads(model, ids)
    _set_fused(model, True)
    loss, grads = _loss_and_grads(model, ids)
    assert grads.keys() == grads_ref.keys()
    assert len(grads) == 6
    assert _relative(loss, loss_ref) <= 2 * torch.finfo(torch.bfloat16).eps  # a float32 loss of bf16 logits
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        assert _relative(grad, grads_ref[name]) <= 4 * torch.finfo(torch.bfloat16).eps, name


def _close_bf16(actual: torch.Tensor, expected: torch.Tensor, changed_from: torch.Tensor) -> None:
    """bf16 logits of a whole model computed in another order: norm-relative, a few roundings per layer."""
    assert _relative(actual, expected) <= 4 * torch.finfo(torch.bfloat16).eps
    assert _relative(changed_from, expected) > 0.1, "the adapter must move the logits far more than that"


def test_merged_routed_and_mixed_models_agree_with_the_fused_one() -> None:
    """bf16: merged = fused unmerged; routed per sample = each adapter alone; IA3 and LoRA on one layer compose."""
    model = _llama(torch.bfloat16, 11)
    model.add_adapter(
        "other", IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    )
    randomize(model, 12, adapter="other")
    model.eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model.get_base_model()
        with model.disable_adapter():
            plain = base(input_ids=ids).logits
        model.set_adapter("default")
        fused_default = model(input_ids=ids).logits
        model.set_adapter("other")
        fused_other = model(input_ids=ids).logits
        routed = model(input_ids=ids, adapter_names=["default", "other"]).logits
        _close_bf16(routed[0], fused_default[0], changed_from=plain[0])
        _close_bf16(routed[1], fused_other[1], changed_from=plain[1])
        model.set_adapter("default")
        model.merge_adapter()
        merged = model(input_ids=ids).logits
        model.unmerge_adapter()
        _close_bf16(merged, fused_default, changed_from=plain)

    mixed = get_peft_model(
        copy.deepcopy(tiny_llama(hidden=32, seed=3)).to(torch.bfloat16),
        LoraConfig(r=4, target_modules=["k_proj", "down_proj"], init_lora_weights=False),
        mixed=True,
    )
    mixed.add_adapter("ia3", IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    randomize(mixed, 4, adapter="ia3")
    mixed.set_adapter(["default", "ia3"])
    layer = mixed.get_base_model().model.layers[0].mlp.down_proj
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    lora, ia3 = layer.adapters["default"], layer.adapters["ia3"]
    with torch.no_grad():
        scale = ia3.ia3_l.reshape(-1).to(torch.bfloat16)
        delta = (lora.lora_B.weight @ lora.lora_A.weight * lora.scaling).to(torch.bfloat16)
        expected = (x * scale) @ layer.base_layer.weight.T + x @ delta.T
        actual = layer(x)
    assert "IA3" not in type(actual.grad_fn).__name__  # two adapters: the composition, not the fused node
    assert _relative(actual, expected) <= 2 * torch.finfo(torch.bfloat16).eps  # products in another order
    assert _relative(layer.base_layer(x), expected) > 0.1
