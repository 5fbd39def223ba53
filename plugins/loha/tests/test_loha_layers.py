"""LoHa layer adapters: the dense formula on every path and layer type, dropout, precision, init."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from loha_helpers import F64
from torch import nn

from grafting import ConfigError
from grafting.model.layer import LayerCall
from grafting.testing import assert_close, check_module_dropout
from grafting_loha import LoHaAdapter, LoHaConv, LoHaLinear


def _adapter(base: nn.Module, r: int = 3, scaling: float = 0.7, **options: object) -> LoHaAdapter:
    options.setdefault("init_weights", False)
    if isinstance(base, nn.Linear):
        adapter: LoHaAdapter = LoHaLinear(base, r, scaling, **options)  # type: ignore[arg-type]
    else:
        adapter = LoHaConv(base, r, scaling, **options)  # type: ignore[arg-type]
    return adapter.to(base.weight.dtype)


def _call(adapter: LoHaAdapter, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return adapter(x, LayerCall(base, (x,), {}, base(x)))


def _reference(adapter: LoHaAdapter, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The delta from PEFT's recipe: build ΔW in the base's weight shape, then run the base op with it."""
    l1, r1, l2, r2 = adapter.factors()
    weight = ((l1 @ r1) * (l2 @ r2) * adapter.scaling).reshape(base.weight.shape)
    if isinstance(base, nn.Linear):
        return F.linear(x, weight)
    conv = F.conv1d if isinstance(base, nn.Conv1d) else F.conv2d
    return conv(x, weight, None, base.stride, base.padding, base.dilation, base.groups)


def _paths_agree(adapter: LoHaAdapter, base: nn.Module, x: torch.Tensor) -> None:
    """Dense and factored paths: same delta as the reference, same gradients for x and every factor."""
    x = x.clone().requires_grad_()
    params = [x, *adapter.parameters()]
    expected = _reference(adapter, base, x)
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, params, grad_out)
    for path in ("dense", "factored", "auto"):
        adapter.path = path
        actual = _call(adapter, base, x)
        assert_close(actual, expected, rtol=1e-10, atol=1e-10, msg=path)
        grads = torch.autograd.grad(actual, params, grad_out)
        for g, e in zip(grads, expected_grads):
            assert_close(g, e, rtol=1e-10, atol=1e-10, msg=f"{path} gradient")


@given(
    n_in=st.integers(1, 24),
    n_out=st.integers(1, 24),
    r=st.integers(1, 6),
    lead=st.sampled_from([(5,), (2, 3), (1, 1, 4)]),
    seed=st.integers(0, 999),
)
def test_linear_paths_equal_the_dense_formula(n_in: int, n_out: int, r: int, lead: tuple, seed: int) -> None:
    torch.manual_seed(seed)
    base = nn.Linear(n_in, n_out).to(F64)
    _paths_agree(_adapter(base, r), base, torch.randn(*lead, n_in, dtype=F64))


CONVS = {
    "conv2d 3x3 padded": (nn.Conv2d(4, 5, 3, padding=1), (2, 4, 6, 6)),
    "conv2d 1x1": (nn.Conv2d(4, 5, 1), (2, 4, 5, 5)),
    "conv2d strided dilated non-square": (
        nn.Conv2d(3, 4, (3, 2), stride=2, padding=(1, 0), dilation=(1, 2)),
        (2, 3, 9, 8),
    ),
    "conv2d grouped": (nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 5, 5)),
    "conv1d k3": (nn.Conv1d(4, 5, 3, padding=1, stride=2), (2, 4, 9)),
    "conv1d k1": (nn.Conv1d(4, 5, 1), (2, 4, 7)),
}


@pytest.mark.parametrize("effective", [False, True])
@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv_paths_equal_the_dense_formula(name: str, effective: bool) -> None:
    torch.manual_seed(3)
    base, shape = CONVS[name]
    base = base.to(F64)
    adapter = _adapter(base, 3, effective=effective)
    _paths_agree(adapter, base, torch.randn(shape, dtype=F64))


def test_conv_delta_pads_as_its_base_layer_does() -> None:
    """A reflect-padded base: the delta convolves the reflect-padded input, so merging changes nothing."""
    torch.manual_seed(8)
    base = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect").to(F64)
    adapter = _adapter(base, 2)
    x = torch.randn(1, 3, 6, 6, dtype=F64)
    weight = adapter.delta_matrix().reshape(base.weight.shape)
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), weight)
    for path in ("dense", "factored"):
        adapter.path = path
        assert_close(_call(adapter, base, x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("base", "effective", "shapes"),
    [
        (nn.Linear(6, 5), False, {"hada_w1_a": (5, 3), "hada_w1_b": (3, 6)}),
        (nn.Conv2d(4, 5, 3), False, {"hada_w1_a": (5, 3), "hada_w1_b": (3, 36)}),
        (nn.Conv2d(4, 5, 3), True, {"hada_w1_a": (3, 5), "hada_w1_b": (3, 4), "hada_t1": (3, 3, 3, 3)}),
        (nn.Conv2d(4, 5, 1), True, {"hada_w1_a": (5, 3), "hada_w1_b": (3, 4)}),  # 1x1: never effective
        (nn.Conv2d(4, 6, 3, groups=2), False, {"hada_w1_a": (6, 3), "hada_w1_b": (3, 18)}),
        (nn.Conv1d(4, 5, 3), True, {"hada_w1_a": (3, 5), "hada_w1_b": (3, 4), "hada_t1": (3, 3, 3, 1)}),
        (nn.Conv1d(4, 5, 3), False, {"hada_w1_a": (5, 3), "hada_w1_b": (3, 12)}),
    ],
)
def test_parameters_have_peft_names_and_shapes(base: nn.Module, effective: bool, shapes: dict) -> None:
    kwargs = {"effective": effective} if not isinstance(base, nn.Linear) else {}
    params = dict(_adapter(base, 3, **kwargs).named_parameters())
    twins = {k.replace("1", "2"): v for k, v in shapes.items()}
    assert {k: tuple(v.shape) for k, v in params.items()} == {**shapes, **twins}


def test_fresh_adapter_adds_nothing_and_random_init_does() -> None:
    base = nn.Linear(6, 5).to(F64)
    x = torch.randn(4, 6, dtype=F64)
    fresh = _adapter(base, init_weights=True)
    assert torch.count_nonzero(fresh.hada_w2_b) == 0
    assert torch.count_nonzero(fresh.hada_w1_a) > 0
    assert torch.count_nonzero(_call(fresh, base, x)) == 0  # B = 0: exactly nothing, whatever the rounding
    assert _call(_adapter(base, init_weights=False), base, x).abs().max() > 1e-3


def test_rank_dropout_zeroes_rows_and_rescales_the_rest_in_training_only() -> None:
    base = nn.Linear(8, 40).to(F64)
    adapter = _adapter(base, rank_dropout=0.5)
    x = torch.randn(3, 8, dtype=F64)
    full = _reference(adapter, base, x)
    adapter.eval()
    assert_close(_call(adapter, base, x), full, rtol=1e-10, atol=1e-10)
    adapter.train()
    for path in ("dense", "factored"):
        adapter.path = path
        torch.manual_seed(11)
        torch.rand(1)  # the module-dropout draw comes first
        keep = (torch.rand(40) > 0.5).to(F64)
        torch.manual_seed(11)
        out = _call(adapter, base, x)
        assert 0 < keep.sum() < 40, "the seed should drop some rows and keep others"
        assert_close(out, full * (keep / keep.mean()), rtol=1e-10, atol=1e-10)


def test_module_dropout_skips_the_whole_adapter_on_its_draws() -> None:
    base = nn.Linear(6, 5).to(F64)
    adapter = _adapter(base, module_dropout=0.5).train()
    x = torch.randn(2, 6, dtype=F64)
    check_module_dropout(adapter, lambda: _call(adapter, base, x), p=0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_runs_in_its_own_dtype_by_default(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    base = nn.Linear(32, 24).to(dtype)
    adapter = LoHaLinear(base, 4, 0.5, init_weights=False)  # float32 factors, as grafting places them
    x = torch.randn(16, 32).to(dtype)
    reference = F.linear(x.double(), adapter.delta_matrix().detach().double())
    for precision in ("input", "adapter"):
        adapter.precision = precision
        for path in ("dense", "factored"):
            adapter.path = path
            out = _call(adapter, base, x)
            assert out.dtype == dtype
            error = float((out.detach().double() - reference).norm() / reference.norm())
            assert error < 1e-2, f"{precision}/{path}: relative error {error:.3g}"


def test_adapter_precision_computes_in_float32() -> None:
    """``precision="adapter"`` is PEFT's recipe: the input cast up, the delta computed in float32."""
    torch.manual_seed(4)
    base = nn.Linear(16, 12).to(torch.bfloat16)
    adapter = LoHaLinear(base, 3, 0.5, init_weights=False)
    adapter.precision = "adapter"
    adapter.path = "dense"
    x = torch.randn(5, 16).to(torch.bfloat16)
    expected = F.linear(x.float(), adapter.delta_matrix()).to(torch.bfloat16)
    one_step = {"rtol": 2**-7, "atol": 0.0}  # a float32 result rounded once, maybe the other way at a tie
    assert_close(_call(adapter, base, x), expected, **one_step, msg="float32 products")
    with pytest.raises(AssertionError):  # the products taken in bfloat16 are several steps off
        assert_close(F.linear(x, adapter.delta_matrix().to(torch.bfloat16)), expected, **one_step)


def test_autocast_runs_the_products_in_the_autocast_dtype() -> None:
    torch.manual_seed(6)
    base = nn.Linear(32, 24)
    adapter = LoHaLinear(base, 4, 0.5, init_weights=False)
    x = torch.randn(8, 32)
    reference = F.linear(x.double(), adapter.delta_matrix().detach().double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = adapter(x, LayerCall(base, (x,), {}, base(x).float()))
        inner = adapter._compute_dtype(x)
    assert inner == torch.bfloat16
    error = float((out.detach().double() - reference).norm() / reference.norm())
    assert 1e-6 < error < 1e-2, f"relative error {error:.3g}: not bf16 products, or wrong ones"


def test_invalid_path_or_precision_is_a_config_error_when_set() -> None:
    base = nn.Linear(4, 4)
    adapter = _adapter(base)
    with pytest.raises(ConfigError, match=r"path must be one of \['auto', 'dense', 'factored'\], got 'sparse'"):
        adapter.path = "sparse"  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="precision"):
        adapter.precision = "half"  # type: ignore[assignment]
    assert (adapter.path, adapter.precision) == ("auto", "input")  # unchanged
    adapter.path = "dense"
    _call(adapter, base, torch.randn(2, 4))


def test_merge_adds_the_delta_matrix_and_unmerge_removes_it() -> None:
    base = nn.Conv2d(3, 4, 3).to(F64)
    adapter = _adapter(base, effective=True)
    before = base.weight.detach().clone()
    adapter.merge(base)
    delta = adapter.delta_matrix().reshape(before.shape)
    assert_close(base.weight, before + delta, changed_from=before, msg="merged")
    adapter.unmerge(base)
    assert_close(base.weight, before, changed_from=before + delta, msg="unmerged")
