"""BOFT's butterfly and layer adapters: PEFT's matrices and layer rules, the factored path against the dense one."""

from __future__ import annotations

from typing import Any

import peft
import pytest
import torch
import torch.nn.functional as F
from boft_helpers import F64, use_peft_butterflies
from hypothesis import given
from hypothesis import strategies as st
from peft.tuners.boft.layer import Linear as PeftBOFTLinear
from torch import nn

from grafting import ConfigError
from grafting.model.layer import LayerCall
from grafting.testing import assert_close, assert_identical
from grafting_boft import BOFTConv2d, BOFTLinear
from grafting_boft.butterfly import layout

TIGHT = {"rtol": 1e-10, "atol": 1e-10}


def _linear(n_in: int, n_out: int, factors: int, size: int, seed: int = 0) -> tuple[nn.Linear, BOFTLinear]:
    torch.manual_seed(seed)
    base = nn.Linear(n_in, n_out).to(F64)
    adapter = BOFTLinear(factors, n_in // size, size, n_out, conv=False, dropout=0.0, init_weights=False).to(F64)
    return base, adapter


SHAPES = [(16, 4, 2), (32, 4, 3), (16, 2, 3), (24, 4, 2), (8, 8, 1), (12, 3, 1), (64, 2, 5)]


@pytest.mark.parametrize(("n", "size", "factors"), SHAPES)
def test_the_butterfly_is_peft_s_product_of_permuted_block_diagonals(
    n: int, size: int, factors: int, monkeypatch
) -> None:
    use_peft_butterflies(monkeypatch)
    base, adapter = _linear(n, 3, factors, size)
    config = peft.BOFTConfig(boft_block_size=size, boft_n_butterfly_factor=factors, target_modules=["x"])
    theirs = PeftBOFTLinear(base, "default", config=config).to(F64)
    theirs.boft_R["default"].data.copy_(adapter.boft_R.detach())
    expected, _ = theirs.get_delta_weight("default")
    assert_close(adapter.matrix(), expected, **TIGHT)
    assert_close(adapter.matrix() @ adapter.matrix().T, torch.eye(n, dtype=F64), **TIGHT)  # orthogonal


@given(shape=st.sampled_from(SHAPES), n_out=st.integers(1, 7), bias=st.booleans(), seed=st.integers(0, 99))
def test_linear_factored_path_equals_the_rotated_scaled_weight(
    shape: tuple[int, int, int], n_out: int, bias: bool, seed: int
) -> None:
    n, size, factors = shape
    base, adapter = _linear(n, n_out, factors, size, seed)
    if not bias:
        base.bias = None
    x = torch.randn(2, 3, n, dtype=F64, requires_grad=True)
    weight = adapter.boft_s * (base.weight @ adapter.matrix().T)  # W' = diag(s)·W·Bᵀ
    expected = F.linear(x, weight, base.bias)
    actual = adapter.after_base(base(adapter(x)), base)
    params = [x, *adapter.parameters()]
    grad = torch.randn_like(expected)
    assert_close(actual, expected, **TIGHT)
    for got, want in zip(torch.autograd.grad(actual, params, grad), torch.autograd.grad(expected, params, grad)):
        assert_close(got, want, **TIGHT)


def test_conv_runs_with_the_rotated_scaled_kernel_alone_and_as_a_delta() -> None:
    torch.manual_seed(1)
    base = nn.Conv2d(4, 3, 3, stride=2, padding=1, padding_mode="reflect").to(F64)
    adapter = BOFTConv2d(2, 6, 6, 3, conv=True, dropout=0.0, init_weights=False).to(F64)
    x = torch.randn(2, 4, 7, 7, dtype=F64)
    weight = (adapter.boft_s.T * (base.weight.flatten(1) @ adapter.matrix().T)).reshape(base.weight.shape)
    expected = base._conv_forward(x, weight, base.bias)
    with torch.no_grad():
        assert_close(adapter.fused_call(base, x), expected, **TIGHT)
        assert_close(base(x) + adapter(x, LayerCall(base, (x,), {}, base(x))), expected, **TIGHT)


LAYOUTS: list[tuple[dict[str, Any], int]] = [
    ({"boft_block_size": 4, "boft_n_butterfly_factor": 2}, 16),
    ({"boft_block_size": 3, "boft_n_butterfly_factor": 1}, 16),  # 16 % 3
    ({"boft_block_size": 4, "boft_n_butterfly_factor": 4}, 16),  # 4·2³ > 16
    ({"boft_block_size": 6, "boft_n_butterfly_factor": 2}, 24),  # 24 % 12 == 0, 4 blocks of 6
    ({"boft_block_size": 3, "boft_n_butterfly_factor": 2}, 12),  # odd block size
    ({"boft_block_size": 0, "boft_block_num": 8, "boft_n_butterfly_factor": 4}, 16),  # 3 > log2(8)
    ({"boft_block_size": 0, "boft_block_num": 6, "boft_n_butterfly_factor": 2}, 24),  # 6 % 2 == 0, size 4
    ({"boft_block_size": 0, "boft_block_num": 5, "boft_n_butterfly_factor": 1}, 24),  # 24 % 5
    ({"boft_block_size": 0, "boft_block_num": 3, "boft_n_butterfly_factor": 2}, 24),  # 3 % 2
]


@pytest.mark.parametrize(("options", "n"), LAYOUTS)
def test_layer_sizes_are_accepted_and_refused_as_peft_does(options: dict[str, Any], n: int, monkeypatch) -> None:
    use_peft_butterflies(monkeypatch)
    config = peft.BOFTConfig(target_modules=["x"], **options)
    try:
        theirs = PeftBOFTLinear(nn.Linear(n, 2), "default", config=config)
    except ValueError:
        with pytest.raises(ConfigError, match="q_proj"):
            layout(n, config.boft_block_size, config.boft_block_num, config.boft_n_butterfly_factor, "q_proj")
        return
    ours = layout(n, config.boft_block_size, config.boft_block_num, config.boft_n_butterfly_factor, "q_proj")
    assert ours == tuple(theirs.boft_R["default"].shape[1:3])


def test_a_fresh_adapter_is_exactly_the_identity() -> None:
    base = nn.Linear(8, 3).to(F64)
    adapter = BOFTLinear(2, 4, 2, 3, conv=False, dropout=0.0, init_weights=True).to(F64)
    x = torch.randn(4, 8, dtype=F64)
    assert_identical(adapter(x), x)
    y = base(x)
    assert_identical(adapter.after_base(y, base), y)


def test_merge_rounds_once_and_unmerge_restores_the_bits() -> None:
    torch.manual_seed(3)
    base = nn.Linear(16, 12).to(torch.bfloat16)
    adapter = BOFTLinear(2, 4, 4, 12, conv=False, dropout=0.0, init_weights=False)
    before = base.weight.detach().clone()
    exact = adapter.boft_s.double() * (before.double() @ adapter.matrix().double().T)
    adapter.merge(base)
    ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)
    assert float(((base.weight.double() - exact).abs() / ulp).max()) <= 0.51
    adapter.unmerge(base)
    assert_identical(base.weight.detach(), before)
