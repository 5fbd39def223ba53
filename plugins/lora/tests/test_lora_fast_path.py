"""LoRA's fused forward against its plain reference, and the mixed-precision default against PEFT's numerics."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import grafting
from grafting.errors import ConfigError
from grafting.model.layer import AdaptedLayer
from grafting.testing import assert_identical, tiny_llama
from grafting.toolkit import compute_dtype
from grafting_lora.layers import LoraConv, LoraLinear

HALF = [torch.bfloat16, torch.float16]


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def _tolerance(dtype: torch.dtype) -> float:
    """Norm-relative error of a few roundings in ``dtype`` (a bf16 sum of products lands near 1e-2 at worst)."""
    return 2 * torch.finfo(dtype).eps


def _layer(kind: str, dtype: torch.dtype, **options: object) -> AdaptedLayer:
    torch.manual_seed(0)
    base: nn.Module = nn.Linear(24, 20, bias=kind != "linear-nobias") if kind != "conv1d" else Conv1D(20, 24)
    if kind == "conv1d":
        nn.init.normal_(base.weight, std=0.2)
    base.requires_grad_(False)
    if kind == "linear-trainbias":  # bias="all": the base bias trains, its gradient comes from the fused node
        base.bias.requires_grad_(True)
    layer = AdaptedLayer(base.to(dtype))
    adapter = LoraLinear(base, 4, 1.5, init=False, **options)  # type: ignore[arg-type]
    layer.add_adapter("a", adapter)
    layer.set_active(["a"])
    return layer


def _run(layer: AdaptedLayer, x: torch.Tensor, fused: bool, seed: int = 3) -> tuple[torch.Tensor, dict]:
    layer.adapters["a"].fused = fused
    x = x.detach().requires_grad_(True)
    torch.manual_seed(seed)  # dropout draws the same mask on both paths
    y = layer(x)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    (y * upstream).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    grads["x"] = x.grad.clone()
    layer.zero_grad(set_to_none=True)
    return y.detach(), grads


CASES = [
    ("linear", {}),
    ("linear-nobias", {}),
    ("conv1d", {}),
    ("linear-trainbias", {}),
    ("linear", {"lora_bias": True}),
    ("linear", {"use_dora": True}),
    ("linear-nobias", {"use_dora": True}),
    ("linear", {"dropout": 0.3}),
    ("linear", {"dropout": 0.3, "use_dora": True}),
]


@pytest.mark.parametrize("dtype", [*HALF, torch.float32, torch.float64])
@pytest.mark.parametrize(("kind", "options"), CASES)
def test_the_fused_path_agrees_with_the_reference(kind: str, options: dict, dtype: torch.dtype) -> None:
    """Values and gradients (input, A, B, bias, magnitude) of the fused path equal the plain composition's."""
    layer = _layer(kind, dtype, **options)
    layer.train()
    if dtype == torch.float64:
        layer.adapters["a"].double()
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(2)).to(dtype)
    y_ref, g_ref = _run(layer, x, fused=False)
    y, g = _run(layer, x, fused=True)
    assert y.dtype == dtype
    assert y_ref.dtype == dtype
    tol = _tolerance(dtype) if dtype in HALF else 0.0
    with torch.no_grad():
        moved = _relative(layer.base_layer(x), y_ref)
    assert moved > 10 * max(tol, 1e-3), "the adapter must move the output far more than the tolerance"
    assert _relative(y, y_ref) <= tol
    assert g.keys() == g_ref.keys()
    assert {"x", "adapters.a.lora_A.weight", "adapters.a.lora_B.weight"} <= g.keys()
    for name, grad in g.items():
        assert grad.dtype == g_ref[name].dtype
        assert _relative(grad, g_ref[name]) <= 2 * tol, name


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(("p", "node"), [(0.3, True), (1.0, False)])
def test_dropout_runs_inside_the_one_node_layer(dtype: torch.dtype, p: float, node: bool) -> None:
    """Training with dropout takes the one-node layer (the mask applied inside it); p = 1 composes as usual."""
    layer = _layer("linear", dtype, dropout=p)
    layer.train()
    x = torch.randn(6, 24, generator=torch.Generator().manual_seed(4)).to(dtype).requires_grad_(True)
    y = layer(x)
    assert ("LoraLinearFunction" in type(y.grad_fn).__name__) == node
    y.sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    layer.zero_grad(set_to_none=True)
    if not node:  # everything dropped: the adapter's path adds nothing
        assert_identical(y.detach(), layer.base_layer(x).detach())
        return
    y_ref, g_ref = _run(layer, x, fused=False, seed=9)
    y_fused, g_fused = _run(layer, x, fused=True, seed=9)
    assert _relative(y_fused, y_ref) <= _tolerance(dtype)
    for name, grad in g_fused.items():
        assert _relative(grad, g_ref[name]) <= 2 * _tolerance(dtype), name
    layer.eval()  # inference: no dropout, the plain fused ops
    with torch.no_grad():
        assert _relative(layer(x), layer.base_layer(x)) > 0.05


@pytest.mark.parametrize("dtype", HALF)
def test_dora_runs_as_one_node_with_norms_from_a_skinny_product(dtype: torch.dtype) -> None:
    """DoRA takes its one-node layer; the row norms match ‖W + ΔW‖ in float32 and follow a changed weight."""
    from grafting_lora.dora_node import dora_norm_squared

    layer = _layer("linear", dtype, use_dora=True)
    adapter = layer.adapters["a"]
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(6)).to(dtype).requires_grad_(True)
    y = layer(x)
    assert "DoraLinearFunction" in type(y.grad_fn).__name__
    weight = layer.base_layer.weight
    for _ in range(2):
        exact = torch.linalg.vector_norm(weight.double() + adapter.delta_matrix().double(), dim=1)
        sq = torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square()
        fast = dora_norm_squared(weight, sq, adapter.lora_A.weight, adapter.lora_B.weight, adapter.scaling).sqrt()
        assert fast.dtype == torch.float32
        assert _relative(fast, exact) <= torch.finfo(dtype).eps  # only the cross term is rounded to `dtype`
        with torch.no_grad():
            weight.mul_(1.5)  # a changed weight (its version moves): the kept ‖W‖² is recomputed
    with torch.no_grad():
        y_fused = layer(x)
        adapter.fused = False
        y_ref = layer(x)
    assert _relative(y_fused, y_ref) <= _tolerance(dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_products_run_in_the_base_dtype(dtype: torch.dtype) -> None:
    """float32 adapter weights on a half-precision base: no float32 activation is made; "adapter" makes one."""
    layer = _layer("linear", dtype)
    x = torch.randn(2, 24).to(dtype)
    seen: list[torch.dtype] = []

    def record(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        seen.append(out.dtype)

    assert compute_dtype("input", torch.float32, x) == dtype
    assert compute_dtype("adapter", torch.float32, x) == torch.float32
    assert compute_dtype("input", torch.float32, x.double()) == torch.float32  # only half precision is cast down
    adapter = layer.adapters["a"]
    adapter.precision = "adapter"
    handle = adapter.register_forward_hook(record)
    layer(x)
    handle.remove()
    assert seen == [torch.float32]
    adapter.precision = "fast"  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="precision"):
        layer(x)


@pytest.mark.parametrize("dtype", HALF)
def test_conv_adapters_compute_in_the_base_dtype(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    base = nn.Conv2d(3, 6, 3, padding=1).to(dtype).requires_grad_(False)
    adapter = LoraConv(base, 2, 2.0, init=False)
    layer = AdaptedLayer(base)
    layer.add_adapter("a", adapter)
    layer.set_active(["a"])
    x = torch.randn(2, 3, 8, 8).to(dtype)
    fast = layer(x)
    adapter.precision = "adapter"
    exact = layer(x)
    assert fast.dtype == exact.dtype == dtype
    assert _relative(fast, exact) <= _tolerance(dtype)
    assert _relative(base(x), exact) > 0.05


def _model(precision: str | None, dtype: torch.dtype = torch.bfloat16, **options: object) -> nn.Module:
    base = tiny_llama(hidden=32).to(dtype)
    torch.manual_seed(7)
    config = grafting.LoraConfig(
        **{
            "r": 4,
            "lora_alpha": 8,
            "target_modules": "all-linear",
            "init_lora_weights": False,
            "precision": precision,
            **options,
        }
    )
    return grafting.get_peft_model(base, config)


@pytest.mark.parametrize("use_dora", [False, True])
def test_mixed_precision_and_peft_numerics_agree_within_bf16_rounding(use_dora: bool) -> None:
    fast, exact = _model(None, use_dora=use_dora), _model("adapter", use_dora=use_dora)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_fast, out_exact = fast(input_ids=ids).logits, exact(input_ids=ids).logits
        with fast.disable_adapter():
            plain = fast(input_ids=ids).logits
    assert _relative(out_fast, out_exact) <= _tolerance(torch.bfloat16)
    assert _relative(plain, out_exact) > 10 * _tolerance(torch.bfloat16)


def test_short_training_curves_match() -> None:
    """Six AdamW steps on a bf16 model: the default's losses follow PEFT's numerics within bf16 rounding."""
    curves = []
    ids = torch.arange(16).repeat(2, 1)  # next token = this one + 1: learnable in a few steps
    for precision in (None, "adapter"):
        model = _model(precision, lora_dropout=0.1, lora_alpha=32)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        assert {p.dtype for p in params} == {torch.float32}  # master weights stay float32
        opt = torch.optim.AdamW(params, lr=3e-2)
        torch.manual_seed(11)
        losses = []
        for _ in range(6):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        curves.append(torch.tensor(losses))
    fast, exact = curves
    assert exact[-1] < exact[0] - 0.03, "the run must learn for the comparison to mean anything"
    assert fast[-1] < fast[0] - 0.03
    torch.testing.assert_close(fast, exact, rtol=2e-2, atol=0.0)


def test_precision_is_written_only_when_set(tmp_path: Path) -> None:
    model = _model(None, dtype=torch.float32)
    assert "precision" not in model.peft_config["default"].to_dict()
    model.save_pretrained(tmp_path / "plain")
    assert "precision" not in json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    exact = _model("adapter", dtype=torch.float32)
    exact.save_pretrained(tmp_path / "exact")
    assert json.loads((tmp_path / "exact" / "adapter_config.json").read_text())["precision"] == "adapter"
    loaded = grafting.PeftModel.from_pretrained(tiny_llama(hidden=32), tmp_path / "exact")
    assert {m.precision for m in loaded.modules() if isinstance(m, LoraLinear)} == {"adapter"}
    with pytest.raises(ConfigError, match="precision"):
        grafting.LoraConfig(precision="float32")


def test_float32_models_keep_peft_bits() -> None:
    """In float32 the default and PEFT's numerics are the same computation."""
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    a, b = _model(None, dtype=torch.float32), _model("adapter", dtype=torch.float32)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


def _routed_model(fused: bool) -> nn.Module:
    model = _model(None)
    for k, r in enumerate((2, 6)):  # different ranks: the gathered product pads them
        torch.manual_seed(20 + k)
        config = grafting.LoraConfig(r=r, lora_alpha=3 * r, target_modules="all-linear", init_lora_weights=False)
        model.add_adapter(f"extra{k}", config)
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.fused = fused
    return model


def test_per_sample_lora_adapters_run_as_one_gathered_product() -> None:
    """bf16, three adapters and the base in one batch: the outputs of the one-adapter-at-a-time path and of
    each sample run alone."""
    names = ["extra1", "__base__", "default", "extra0", "extra1"]
    ids = torch.randint(0, 64, (len(names), 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        grouped = _routed_model(True)(input_ids=ids, adapter_names=names).logits
        model = _routed_model(False)
        plain = model(input_ids=ids, adapter_names=names).logits
        alone = model(input_ids=ids[:1], adapter_names=["extra1"]).logits
        base = model(input_ids=ids[1:2], adapter_names=["__base__"]).logits
    tol = _tolerance(torch.bfloat16)
    assert _relative(grouped, plain) <= tol
    assert _relative(grouped[:1], alone) <= tol
    assert _relative(grouped[1:2], base) <= tol
    assert _relative(grouped[:1], base) > 10 * tol  # the routed adapter changes the output


@pytest.mark.parametrize("dtype", HALF)
def test_the_gathered_product_agrees_with_one_adapter_at_a_time(dtype: torch.dtype) -> None:
    """One layer, three LoRA adapters of ranks 2, 4, 6 and the base routed per sample: values and gradients."""
    names = ["a1", "__base__", "a0", "a2", "a1", "a0"]
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        base = nn.Linear(24, 20).to(dtype).requires_grad_(False)
        layer = AdaptedLayer(base)
        for k in range(3):
            adapter = LoraLinear(base, 2 * (k + 1), 0.5 + k, init=False)
            adapter.fused = fused
            layer.add_adapter(f"a{k}", adapter)
        x = torch.randn(len(names), 5, 24, generator=torch.Generator().manual_seed(2)).to(dtype).requires_grad_(True)
        with grafting.route_samples(names):
            y = layer(x)
        (y.float() * torch.linspace(-1, 1, 20)).sum().backward()
        grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
        results.append((y.detach(), {**grads, "x": x.grad}))
    (grouped, g_grouped), (plain, g_plain) = results
    tol = _tolerance(dtype)
    assert _relative(grouped, plain) <= tol
    assert _relative(grouped[1], base(x[1].detach())) <= tol  # the base sample is untouched
    assert g_grouped.keys() == g_plain.keys()
    assert len(g_grouped) == 7  # x, and A and B of all three adapters
    for name, grad in g_grouped.items():
        assert _relative(grad, g_plain[name]) <= 2 * tol, name


@pytest.mark.parametrize("dtype", HALF)
def test_inference_takes_the_same_fused_forward(dtype: torch.dtype) -> None:
    """Without autograd the fused forward runs as plain ops: the same values as with autograd and as the reference."""
    layer = _layer("linear", dtype)
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.no_grad():
        inference = layer(x)
    training = layer(x).detach()
    layer.adapters["a"].fused = False
    with torch.no_grad():
        reference = layer(x)
    assert _relative(inference, training) <= _tolerance(dtype)  # the same kernels
    assert _relative(inference, reference) <= _tolerance(dtype)
    assert _relative(layer.base_layer(x), reference) > 10 * _tolerance(dtype)
