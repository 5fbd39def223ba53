"""LoRA's one-node layer with the scaling inside its products, and the factor casts kept for inference.

The node (:class:`~grafting_lora.fused.LoraLinearFunction`) against the reference (``fused = False``)
over dtypes, bias, scaling, the adapter's dtype, input rank and dropout; the kernels it launches;
:func:`~grafting_lora.scaled_products.scaled_product` in every form the CPU runs; and
:class:`~grafting_lora.factor_casts.FactorCasts`: kept while the factors are unchanged, dropped when an
optimizer step, an in-place write or a hot-swap changes them, never in ``state_dict``, copies or pickles.
"""

from __future__ import annotations

import copy
import io
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import grafting
from grafting.model.layer import AdaptedLayer
from grafting.testing import assert_close
from grafting_lora.factor_casts import FactorCasts, factor_casts
from grafting_lora.fused import LoraLinearFunction
from grafting_lora.layers import LoraLinear
from grafting_lora.scaled_products import _probe, scaled_product, writes_float32

HALF = [torch.bfloat16, torch.float16]


def _layer(dtype: torch.dtype, bias: bool, scaling: float, adapter_dtype: torch.dtype, dropout: float) -> AdaptedLayer:
    torch.manual_seed(0)
    base = nn.Linear(24, 20, bias=bias).requires_grad_(False)
    layer = AdaptedLayer(base.to(dtype))
    adapter = LoraLinear(base, 4, scaling, init=False, dropout=dropout)
    nn.init.normal_(adapter.lora_B.weight, std=0.5)  # an effect far above the comparison's tolerance
    adapter.to(adapter_dtype)
    layer.add_adapter("a", adapter)
    layer.set_active(["a"])
    return layer


def _adapter(layer: AdaptedLayer) -> LoraLinear:
    adapter = layer.adapters["a"]
    assert isinstance(adapter, LoraLinear)
    return adapter


def _forward_backward(layer: AdaptedLayer, x: torch.Tensor, fused: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    _adapter(layer).fused = fused
    x = x.detach().requires_grad_(True)
    torch.manual_seed(3)  # dropout draws the same mask on both paths
    y = layer(x)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    (y * upstream).sum().backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    grads["x"] = x.grad.clone()
    layer.zero_grad(set_to_none=True)
    return y.detach(), grads


@given(
    dtype=st.sampled_from(HALF),
    bias=st.booleans(),
    scaling=st.sampled_from([1.0, 0.5, 1.5, 3.0]),
    adapter_half=st.booleans(),
    batched=st.booleans(),
    dropout=st.sampled_from([0.0, 0.3]),
)
def test_the_node_matches_the_reference(
    dtype: torch.dtype, bias: bool, scaling: float, adapter_half: bool, batched: bool, dropout: float
) -> None:
    """Values and gradients (input, A, B) of the node equal the reference's, in their dtypes."""
    layer = _layer(dtype, bias, scaling, dtype if adapter_half else torch.float32, dropout)
    shape = (3, 5, 24) if batched else (7, 24)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    y_ref, g_ref = _forward_backward(layer, x, fused=False)
    y, g = _forward_backward(layer, x, fused=True)
    with torch.no_grad():
        base = layer.base_layer(x)
    _close(y, y_ref, dtype, changed_from=base)
    assert g.keys() == g_ref.keys() == {"x", "adapters.a.lora_A.weight", "adapters.a.lora_B.weight"}
    for name, grad in g.items():
        _close(grad, g_ref[name], dtype, msg=name)


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, **options: Any) -> None:
    """Within a few roundings of the compute ``dtype`` (the two paths round at different points): 8 relative
    to the entry, 4 relative to the largest entry (an entry that cancels keeps its terms' rounding)."""
    eps = torch.finfo(dtype).eps
    scale = expected.abs().max().item()
    assert_close(actual, expected, rtol=8 * eps, atol=4 * eps * scale, **options)


def _ops(run: Any) -> Counter[str]:
    """The kernel-launching aten ops ``run`` calls (views and allocations left out)."""
    free = {"view", "_unsafe_view", "t", "transpose", "expand", "as_strided", "empty", "new_empty", "detach", "reshape"}

    class Record(TorchDispatchMode):
        seen: ClassVar[Counter[str]] = Counter()

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if func.overloadpacket.__name__ not in free:
                Record.seen[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    with Record():
        run()
    return Record.seen


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_the_node_launches_only_its_products_and_the_casts(adapter_dtype: torch.dtype) -> None:
    """Forward: the factors' casts and three products; backward: five products and the gradients' casts.

    No kernel scales anything: the scaling is each product's ``alpha``, and a gradient's cast to the
    factor's dtype carries it where the product cannot (float32 from bf16 on CPU).
    """
    x = torch.randn(6, 24, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(20, 24, dtype=torch.bfloat16)
    a = torch.randn(4, 24, dtype=adapter_dtype, requires_grad=True)
    b = torch.randn(20, 4, dtype=adapter_dtype, requires_grad=True)
    outputs: list[torch.Tensor] = []
    forward = _ops(lambda: outputs.append(LoraLinearFunction.apply(x, w, None, a, b, 1.5, 0.0)))
    upstream = torch.ones_like(outputs[0])
    backward = _ops(lambda: outputs[0].backward(upstream))
    casts = 2 if adapter_dtype != torch.bfloat16 else 0
    assert forward == Counter({"mm": 1, "addmm": 1, "addmm_": 1, **({"_to_copy": casts} if casts else {})})
    products = Counter({"mm": 3 if casts else 2, "addmm": 1 if casts else 2, "addmm_": 1})
    # float32 gradients from bf16 products: A's cast, and B's scale-and-cast in one kernel
    assert backward == products + Counter({"_to_copy": 1, "mul": 1} if casts else {})
    assert a.grad is not None
    assert b.grad is not None
    assert (a.grad.dtype, b.grad.dtype) == (adapter_dtype, adapter_dtype)


@pytest.mark.parametrize(
    ("dtype", "alpha"), [(torch.bfloat16, 1.0), (torch.bfloat16, 0.75), (torch.float32, 1.0), (torch.float32, 2.5)]
)
def test_a_scaled_product_is_alpha_times_the_product_in_its_dtype(dtype: torch.dtype, alpha: float) -> None:
    """``scaled_product(x, y, dtype, alpha)`` is ``alpha·(x·y)`` written in ``dtype``, from bf16 factors."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(9, 16, generator=generator).to(torch.bfloat16)
    y = torch.randn(16, 7, generator=generator).to(torch.bfloat16)
    got = scaled_product(x, y, dtype, alpha)
    expected = ((x.double() @ y.double()) * alpha).to(dtype)
    assert got.dtype == dtype
    assert got.is_contiguous()
    assert_close(got, expected, rtol=torch.finfo(torch.bfloat16).eps, atol=1e-2)


def test_the_float32_product_probe_answers_false_on_cpu_without_raising() -> None:
    """CPU and meta have no ``out_dtype`` products: the probe swallows the error and the portable form runs."""
    assert _probe(torch.device("cpu")) is False
    assert writes_float32(torch.device("cpu")) is False
    assert writes_float32(torch.device("meta")) is False


def _inference_layer() -> AdaptedLayer:
    layer = _layer(torch.bfloat16, True, 1.5, torch.float32, 0.0)
    layer.eval()
    return layer


def _reference(layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
    adapter = _adapter(layer)
    adapter.fused = False
    with torch.no_grad():
        out = layer(x)
    adapter.fused = True
    return out


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 24, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)


def test_inference_reuses_the_cast_factors_while_they_are_unchanged() -> None:
    """Two no-grad forwards cast the factors once; with autograd nothing is kept."""
    layer, x = _inference_layer(), _x()
    adapter = _adapter(layer)
    y = layer(x)  # autograd on: the node runs, nothing kept
    assert len(factor_casts(adapter)) == 0
    with torch.no_grad():
        first = layer(x)
        kept = factor_casts(adapter).cast("A", adapter.lora_A.weight, torch.bfloat16)
        second = layer(x)
        assert factor_casts(adapter).cast("A", adapter.lora_A.weight, torch.bfloat16) is kept
    assert len(factor_casts(adapter)) == 2
    assert torch.equal(first, second)
    _close(first, _reference(layer, x), torch.bfloat16, changed_from=layer.base_layer(x).detach())
    _close(first, y.detach(), torch.bfloat16)


def _changed_by_sgd(adapter: LoraLinear, layer: AdaptedLayer, x: torch.Tensor) -> None:
    optimizer = torch.optim.SGD(adapter.parameters(), lr=0.5, foreach=False)
    layer(x).float().square().sum().backward()
    optimizer.step()


def _changed_by_fused_adamw(adapter: LoraLinear, layer: AdaptedLayer, x: torch.Tensor) -> None:
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=0.5, fused=True)  # writes without moving _version
    layer(x).float().square().sum().backward()
    optimizer.step()


def _changed_in_place(adapter: LoraLinear, layer: AdaptedLayer, x: torch.Tensor) -> None:
    with torch.no_grad():
        adapter.lora_B.weight.copy_(torch.randn(adapter.lora_B.weight.shape))


def _changed_by_load(adapter: LoraLinear, layer: AdaptedLayer, x: torch.Tensor) -> None:
    state = {k: torch.randn_like(v) for k, v in adapter.state_dict().items()}
    adapter.load_state_dict(state)


@pytest.mark.parametrize("change", [_changed_by_sgd, _changed_by_fused_adamw, _changed_in_place, _changed_by_load])
def test_a_changed_factor_is_cast_again(change: Any) -> None:
    """After an optimizer step (fused AdamW too), an in-place write or a load, inference uses the new values."""
    layer, x = _inference_layer(), _x()
    adapter = _adapter(layer)
    with torch.no_grad():
        before = layer(x)
    assert len(factor_casts(adapter)) == 2
    change(adapter, layer, x)
    with torch.no_grad():
        after = layer(x)
    _close(after, _reference(layer, x), torch.bfloat16, changed_from=before)


def _model() -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 20), nn.ReLU(), nn.Linear(20, 8)).to(torch.bfloat16)
    config = grafting.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False)
    return grafting.get_peft_model(base, config)


def test_a_hot_swapped_adapter_is_cast_again(tmp_path: Path) -> None:
    """Hot-swapping writes the factors in place: the next forward casts the new ones."""
    model, other = _model(), _model()
    with torch.no_grad():
        for p in other.parameters():
            if p.requires_grad:
                p.add_(0.5)
    model.eval()
    x = _x().view(-1, 24)
    with torch.no_grad():
        before = model(x)
        other.save_pretrained(tmp_path)
        grafting.hotswap_adapter(model, tmp_path, "default")
        after = model(x)
        expected = other.eval()(x)
    _close(after, expected, torch.bfloat16, changed_from=before)


def test_the_kept_casts_are_in_no_state_dict_copy_or_pickle() -> None:
    """The cache adds no ``state_dict`` entry; a deep copy or a pickle starts with none, and computes its own."""
    layer, x = _inference_layer(), _x()
    adapter = _adapter(layer)
    keys = set(layer.state_dict())
    with torch.no_grad():
        layer(x)
    assert len(factor_casts(adapter)) == 2
    assert set(layer.state_dict()) == keys
    twin = copy.deepcopy(layer)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (twin, loaded):
        assert len(factor_casts(_adapter(other))) == 0
        with torch.no_grad():
            _adapter(other).lora_B.weight.mul_(-1.0)
            _close(other(x), _reference(other, x), torch.bfloat16, changed_from=layer(x))
    assert len(factor_casts(adapter)) == 2
    with torch.no_grad():
        _close(layer(x), _reference(layer, x), torch.bfloat16, changed_from=twin(x))


def test_clear_drops_the_kept_copies_after_a_write_through_data() -> None:
    """``.data`` writes bypass the version counter: :meth:`FactorCasts.clear` is the way to say so."""
    casts, factor = FactorCasts(), nn.Parameter(torch.randn(4, 6))
    with torch.no_grad():
        first = casts.cast("A", factor, torch.bfloat16)
        factor.data.mul_(2.0)
        assert casts.cast("A", factor, torch.bfloat16) is first
        casts.clear()
        again = casts.cast("A", factor, torch.bfloat16)
    assert torch.equal(again, factor.detach().to(torch.bfloat16))
    assert torch.equal(again, first * 2.0)
