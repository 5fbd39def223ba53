"""The LoHa product: the factored evaluation equals the dense formula, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from grafting.testing import assert_close
from grafting_loha.hadamard import (
    col_kron,
    dense_delta,
    factored_delta,
    factored_linear,
    prefer_factored,
    row_kron,
)

F64 = torch.float64


def _factors(n_out: int, n_in: int, rank: int, seed: int, dtype: torch.dtype = F64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(n_out, rank), (rank, n_in), (n_out, rank), (rank, n_in)]
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]


def _reference(x: torch.Tensor, factors: list[torch.Tensor], row_scale: torch.Tensor | float) -> torch.Tensor:
    """The dense formula, written out independently of the module under test."""
    l1, r1, l2, r2 = factors
    delta = (l1 @ r1) * (l2 @ r2)
    delta = delta * (row_scale[:, None] if isinstance(row_scale, torch.Tensor) else row_scale)
    return F.linear(x, delta)


shapes = st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 5), st.integers(0, 2**16))


@given(shape=shapes)
def test_kronecker_factors_multiply_to_the_hadamard_product(shape: tuple[int, int, int, int]) -> None:
    n_out, n_in, rank, seed = shape
    l1, r1, l2, r2 = _factors(n_out, n_in, rank, seed)
    u, v = factored_delta(l1, r1, l2, r2, 0.7)
    assert u.shape == (n_out, rank * rank)
    assert v.shape == (rank * rank, n_in)
    assert_close(u @ v, ((l1 @ r1) * (l2 @ r2)) * 0.7, rtol=1e-12, atol=1e-12)
    assert_close(dense_delta(l1, r1, l2, r2, 0.7), u @ v, rtol=1e-12, atol=1e-12)


def test_row_and_column_kronecker_layouts() -> None:
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 5.0, 7.0]])
    assert row_kron(a, b).tolist() == [[3.0, 5.0, 7.0, 6.0, 10.0, 14.0]]
    assert col_kron(a.T, b.T).T.tolist() == [[3.0, 5.0, 7.0, 6.0, 10.0, 14.0]]


@given(shape=shapes, lead=st.sampled_from([(3,), (2, 3), (1, 2, 2)]), per_row=st.booleans())
def test_factored_linear_equals_the_dense_formula_with_gradients(
    shape: tuple[int, int, int, int], lead: tuple[int, ...], per_row: bool
) -> None:
    n_out, n_in, rank, seed = shape
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*lead, n_in, generator=gen, dtype=F64, requires_grad=True)
    factors = _factors(n_out, n_in, rank, seed)
    row_scale: torch.Tensor | float = torch.rand(n_out, generator=gen, dtype=F64) if per_row else 1.3
    grad_out = torch.randn(*lead, n_out, generator=gen, dtype=F64)

    expected = _reference(x, factors, row_scale)
    expected_grads = torch.autograd.grad(expected, [x, *factors], grad_out)
    actual = factored_linear(x, *factors, row_scale, F64)
    actual_grads = torch.autograd.grad(actual, [x, *factors], grad_out)

    assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    for name, a, e in zip(["x", "l1", "r1", "l2", "r2"], actual_grads, expected_grads):
        assert_close(a, e, rtol=1e-10, atol=1e-10, msg=f"grad {name}")


def test_factored_linear_passes_gradcheck() -> None:
    x = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)
    factors = _factors(4, 5, 3, seed=7)
    assert torch.autograd.gradcheck(lambda *t: factored_linear(t[0], *t[1:], 0.6, F64), (x, *factors))


def test_factored_linear_computes_only_the_gradients_asked_for() -> None:
    x = torch.randn(3, 6, dtype=F64)  # no grad wanted for x
    l1, r1, l2, r2 = _factors(5, 6, 2, seed=3)
    r1.requires_grad_(False)
    r2.requires_grad_(False)
    out = factored_linear(x, l1, r1, l2, r2, 1.0, F64)
    out.sum().backward()
    assert l1.grad is not None
    assert l2.grad is not None
    assert r1.grad is None
    assert r2.grad is None
    assert x.grad is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_products_stay_within_rounding_of_the_formula(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, 48, generator=gen).to(dtype)
    factors = [f.detach().float() for f in _factors(40, 48, 4, seed=9)]
    out = factored_linear(x, *factors, 0.5, dtype)
    assert out.dtype == dtype
    reference = _reference(x.double(), [f.double() for f in factors], 0.5)
    error = (out.double() - reference).norm() / reference.norm()
    assert error < 2e-2, f"relative error {error:.3g} is more than {dtype} rounding"


@pytest.mark.parametrize(
    ("n_out", "n_in", "rank", "positions", "factored"),
    [
        (2048, 2048, 16, 8192, True),  # square projection of a 1B model, a training batch
        (5632, 2048, 16, 8192, True),  # MLP up projection
        (256, 2048, 16, 8192, False),  # grouped-query k/v projection: out = r², dense is cheaper
        (2048, 2048, 16, 1, True),  # one decoding step: building ΔW would dominate
        (16, 16, 8, 64, False),  # a layer narrower than r²
    ],
)
def test_path_choice_on_known_shapes(n_out: int, n_in: int, rank: int, positions: int, factored: bool) -> None:
    assert prefer_factored(n_out, n_in, rank, positions) is factored


@given(n_out=st.integers(1, 9), n_in=st.integers(1, 9), rank=st.integers(1, 4), seed=st.integers(0, 99))
def test_dense_delta_gradients_are_plain_autograds(n_out: int, n_in: int, rank: int, seed: int) -> None:
    ours = _factors(n_out, n_in, rank, seed, torch.float32)
    plain = [t.detach().clone().requires_grad_() for t in ours]
    weight = torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(seed + 1))
    (dense_delta(*ours, 0.7) * weight).sum().backward()
    l1, r1, l2, r2 = plain
    ((l1 @ r1) * (l2 @ r2) * 0.7 * weight).sum().backward()
    for a, b in zip(ours, plain, strict=True):
        assert_close(a.grad, b.grad, msg="gradient")


def test_dense_delta_keeps_only_the_factors_for_backward() -> None:
    factors = _factors(64, 48, 4, seed=0, dtype=torch.float32)
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        dense_delta(*factors, 0.5)
    assert sum(saved) == sum(t.numel() for t in factors)  # not the two (64, 48) products
