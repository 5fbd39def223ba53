"""LoKr layer adapters: the factored product against the reference, PEFT's shapes, init, dropout, precision."""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from lokr_helpers import F64, TOL
from peft.tuners.lokr.layer import factorization
from torch import nn

from grafting import ConfigError
from grafting.model.layer import LayerCall
from grafting.testing import assert_close, check_module_dropout
from grafting_lokr import LoKrAdapter, LoKrConv, LoKrLinear
from grafting_lokr.kron import kron, split_size


def _adapter(base: nn.Module, r: int = 2, scaling: float = 0.7, **options: object) -> LoKrAdapter:
    options.setdefault("init_weights", False)
    cls = LoKrLinear if isinstance(base, nn.Linear) else LoKrConv
    return cls(base, r, scaling, **options).to(base.weight.dtype)  # type: ignore[arg-type]


def _call(adapter: LoKrAdapter, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return adapter(x, LayerCall(base, (x,), {}, base(x)))


@given(size=st.integers(1, 400), factor=st.sampled_from([-1, 1, 2, 3, 4, 5, 7, 8, 16, 50]))
def test_sizes_split_as_peft_splits_them(size: int, factor: int) -> None:
    assert split_size(size, factor) == factorization(size, factor)


@given(
    a=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    b=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    seed=st.integers(0, 99),
)
def test_kron_is_torch_kron(a: list[int], b: list[int], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    left, right = torch.randn(a, generator=gen, dtype=F64), torch.randn(b, generator=gen, dtype=F64)
    assert torch.equal(kron(left, right), torch.kron(left.contiguous(), right.contiguous()))


def _reference(adapter: LoKrAdapter, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The delta from PEFT's recipe: ΔW in the base's weight shape, then the base op with it."""
    weight = (kron(*_kron_operands(adapter)) * adapter.scaling).reshape(base.weight.shape)
    if isinstance(base, nn.Linear):
        return F.linear(x, weight)
    conv = F.conv1d if isinstance(base, nn.Conv1d) else F.conv2d
    return conv(x, weight, None, base.stride, base.padding, base.dilation, base.groups)


def _kron_operands(adapter: LoKrAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    """W1 and W2 built here from the raw parameters, written out (the effective core by its definition)."""
    p = dict(adapter.named_parameters())
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    if "lokr_w2" in p:
        w2 = p["lokr_w2"]
    elif "lokr_t2" in p:
        core, left, right = p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"]
        w2 = (core[:, :, None, None] * left[:, None, :, None, None, None] * right[None, :, None, :, None, None]).sum(
            (0, 1)
        )
    else:
        w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
    return (w1[:, :, None, None] if w2.dim() == 4 else w1), w2


def _paths_agree(adapter: LoKrAdapter, base: nn.Module, x: torch.Tensor) -> None:
    """Factored and reference forward: the reference delta, and the same gradients for x and every factor."""
    x = x.clone().requires_grad_()
    params = [x, *adapter.parameters()]
    expected = _reference(adapter, base, x)
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, params, grad_out)
    for factored in (True, False):
        adapter.factored = factored  # type: ignore[attr-defined]
        actual = _call(adapter, base, x)
        assert_close(actual, expected, changed_from=torch.zeros_like(expected), **TOL, msg=f"factored={factored}")
        for g, e, name in zip(
            torch.autograd.grad(actual, params, grad_out), expected_grads, ["x", *adapter.state_dict()]
        ):
            assert_close(g, e, **TOL, msg=f"factored={factored}: gradient of {name}")


@given(
    n_in=st.integers(1, 40),
    n_out=st.integers(1, 40),
    r=st.integers(1, 6),
    decompose_both=st.booleans(),
    factor=st.sampled_from([-1, 2, 3, 4]),
    lead=st.sampled_from([(5,), (2, 3), (1, 1, 4)]),
    seed=st.integers(0, 999),
)
def test_linear_factored_path_equals_the_reference(
    n_in: int, n_out: int, r: int, decompose_both: bool, factor: int, lead: tuple, seed: int
) -> None:
    torch.manual_seed(seed)
    base = nn.Linear(n_in, n_out).to(F64)
    adapter = _adapter(base, r, decompose_both=decompose_both, decompose_factor=factor)
    _paths_agree(adapter, base, torch.randn(*lead, n_in, dtype=F64))


CONVS = {
    "conv2d 3x3 padded": (nn.Conv2d(4, 8, 3, padding=1), (2, 4, 6, 6)),
    "conv2d 1x1": (nn.Conv2d(8, 6, 1), (2, 8, 5, 5)),
    "conv2d strided dilated non-square": (
        nn.Conv2d(6, 4, (3, 2), stride=2, padding=(1, 0), dilation=(1, 2)),
        (2, 6, 9, 8),
    ),
    "conv2d grouped": (nn.Conv2d(8, 12, 3, padding=1, groups=2), (2, 8, 5, 5)),
    "conv1d k3": (nn.Conv1d(8, 6, 3, padding=1, stride=2), (2, 8, 9)),
    "conv1d k1": (nn.Conv1d(6, 8, 1), (2, 6, 7)),
}


@pytest.mark.parametrize("r", [1, 4])  # 1: W2 factored (effective core too); 4: W2 whole, (c, d, *kernel)
@pytest.mark.parametrize("effective", [False, True])
@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv_delta_equals_the_reference(name: str, effective: bool, r: int) -> None:
    """Effective Conv1d included, which PEFT 0.21 cannot run (torch.kron fails on its (k, 1) kernel view)."""
    torch.manual_seed(3)
    base, shape = CONVS[name]
    base = base.to(F64)
    adapter = _adapter(base, r, effective=effective, decompose_both=True)
    _paths_agree(adapter, base, torch.randn(shape, dtype=F64))


def test_peft_cannot_run_an_effective_conv1d() -> None:
    """Why the interop tests leave the 3-wide Conv1d out of the effective case. If this starts failing,
    PEFT fixed it: add the layer back there."""
    model = nn.Sequential(nn.Conv1d(6, 4, 3)).to(F64)
    wrapped = peft.get_peft_model(model, peft.LoKrConfig(r=1, target_modules=["0"], use_effective_conv2d=True))
    with pytest.raises(RuntimeError, match="view size"):
        wrapped(torch.randn(1, 6, 5, dtype=F64))


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Linear(12, 20),
        lambda: nn.Linear(7, 9),
        lambda: nn.Conv2d(8, 12, 3),
        lambda: nn.Conv2d(8, 12, 1),
        lambda: nn.Conv2d(8, 12, 3, groups=4),
        lambda: nn.Conv1d(8, 6, 3),
    ],
)
@pytest.mark.parametrize(
    "options",
    [
        {"r": 1},
        {"r": 8},
        {"r": 1, "decompose_both": True},
        {"r": 1, "use_effective_conv2d": True},
        {"r": 2, "decompose_factor": 2},
    ],
)
def test_parameters_have_peft_names_and_shapes(make, options: dict) -> None:
    base = make()
    theirs = peft.get_peft_model(nn.Sequential(make()), peft.LoKrConfig(target_modules=["0"], **options))
    expected = {n.split(".")[-2]: tuple(p.shape) for n, p in theirs.named_parameters() if "lokr_" in n}
    config = {k: v for k, v in options.items() if k != "r"}
    if "use_effective_conv2d" in config:
        config["effective"] = config.pop("use_effective_conv2d")
    if isinstance(base, nn.Linear):
        config.pop("effective", None)
    ours = _adapter(base, options["r"], **config)
    assert {n: tuple(p.shape) for n, p in ours.named_parameters()} == expected


@pytest.mark.parametrize(("init", "zero"), [(True, {"lokr_w1", "lokr_w1_a"}), ("lycoris", {"lokr_w2", "lokr_w2_b"})])
@pytest.mark.parametrize("options", [{"r": 1}, {"r": 8}, {"r": 1, "decompose_both": True}])
def test_an_initialized_adapter_adds_nothing_and_a_random_one_does(init: object, zero: set, options: dict) -> None:
    base = nn.Linear(16, 24).to(F64)
    x = torch.randn(4, 16, dtype=F64)
    options = dict(options)
    r = options.pop("r")
    fresh = _adapter(base, r, init_weights=init, **options)
    for name, p in fresh.named_parameters():
        assert (torch.count_nonzero(p) == 0) == (name in zero), name
    assert torch.count_nonzero(_call(fresh, base, x)) == 0  # a zero factor: exactly nothing, whatever the rounding
    assert _call(_adapter(base, r, init_weights=False, **options), base, x).abs().max() > 1e-3


@pytest.mark.parametrize("scale", [False, True])
def test_rank_dropout_zeroes_rows_in_training_only(scale: bool) -> None:
    base = nn.Linear(8, 40).to(F64)
    adapter = _adapter(base, rank_dropout=0.5, rank_dropout_scale=scale)
    x = torch.randn(3, 8, dtype=F64)
    full = _reference(adapter, base, x)
    adapter.eval()
    assert_close(_call(adapter, base, x), full, **TOL)
    adapter.train()
    for factored in (True, False):
        adapter.factored = factored  # type: ignore[attr-defined]
        torch.manual_seed(11)
        torch.rand(1)  # the module-dropout draw comes first
        keep = (torch.rand(40) > 0.5).float()  # float32, divided by its mean in float32, as PEFT does
        torch.manual_seed(11)
        out = _call(adapter, base, x)
        assert 0 < keep.sum() < 40, "the seed should drop some rows and keep others"
        assert_close(out, full * (keep / keep.mean() if scale else keep).to(F64), **TOL)


def test_module_dropout_skips_the_whole_adapter_on_its_draws() -> None:
    base = nn.Conv2d(4, 6, 3).to(F64)
    adapter = _adapter(base, module_dropout=0.5).train()
    x = torch.randn(2, 4, 5, 5, dtype=F64)
    check_module_dropout(adapter, lambda: _call(adapter, base, x), p=0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_computes_in_its_own_dtype_or_in_float32(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    base = nn.Linear(32, 24).to(dtype)
    adapter = LoKrLinear(base, 2, 0.5, init_weights=False)  # float32 factors, as grafting places them
    x = torch.randn(16, 32).to(dtype)
    reference = F.linear(x.double(), adapter.delta_matrix().detach().double())
    for precision, out_dtype in (("input", dtype), ("adapter", torch.float32)):
        adapter.precision = precision
        for factored in (True, False):
            adapter.factored = factored
            out = _call(adapter, base, x)
            assert out.dtype == out_dtype
            error = float((out.detach().double() - reference).norm() / reference.norm())
            assert error < 1e-2, f"{precision}/{factored}: relative error {error:.3g}"
    with pytest.raises(ConfigError, match="precision"):
        adapter.precision = "half"
    assert adapter.precision == "adapter"


def test_merge_adds_the_delta_and_unmerge_removes_it() -> None:
    base = nn.Conv2d(4, 6, 3).to(F64)
    adapter = _adapter(base, 1, effective=True)
    before = base.weight.detach().clone()
    delta = adapter.delta_matrix().detach().reshape(before.shape)
    adapter.merge(base)
    assert_close(base.weight, before + delta, changed_from=before, msg="merged")
    adapter.unmerge(base)
    assert_close(base.weight, before, changed_from=before + delta, msg="unmerged")


def test_the_factored_path_keeps_no_activation_sized_intermediate_for_backward() -> None:
    base = nn.Linear(64, 48).to(F64)
    adapter = _adapter(base, 2)
    x = torch.randn(32, 64, dtype=F64, requires_grad=True)
    call = LayerCall(base, (x,), {}, base(x))
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        adapter(x, call)
    sizes = sorted(t.numel() for t in saved)
    assert sizes[-1] == x.numel(), sizes  # x itself (the base layer keeps it too), nothing else as large
    assert sum(sizes[:-1]) <= 2 * sum(p.numel() for p in adapter.parameters()), sizes  # factors and W1, W2
