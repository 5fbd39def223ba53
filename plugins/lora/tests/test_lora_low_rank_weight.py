"""``LowRankWeight`` alone: every operation an experts layer applies to its 3-D tensor equals the same
operation on the formed ``W + ΔW`` (values and gradients), the low-rank ones without forming it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from grafting.testing import assert_close
from grafting_lora.low_rank_weight import LowRankWeight, Term

E, M, N = 4, 8, 4  # experts, rows, columns of each expert's matrix (grouped kernels want 16-byte strides)
OFFS = torch.tensor([2, 2, 5, 9], dtype=torch.int32)  # an expert with no token, the last one's rows to 9

#: name -> (weight, x) -> result; ``weight`` is (E, M, N), ``x`` (9, N) float.
OPERATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "linear(x, w[e])": lambda w, x: F.linear(x, w[torch.tensor(2)]),
    "linear(x, w[1], bias)": lambda w, x: F.linear(x, w[1], torch.ones(M, dtype=x.dtype)),
    "x @ w[e].mT": lambda w, x: x @ w[3].mT,
    "x @ w[e].T": lambda w, x: x @ w[0].T,
    "w[e] @ xT": lambda w, x: w[2] @ x.T,
    "matmul(x, w[e].t())": lambda w, x: torch.matmul(x, w[1].t()),
    "bmm(w[ids], x)": lambda w, x: torch.bmm(w[torch.arange(9) % E], x.unsqueeze(-1)).squeeze(-1),
    "bmm(x, w[ids].transpose)": lambda w, x: torch.bmm(x.unsqueeze(1), w[torch.arange(9) % E].transpose(1, 2)),
    "matmul over experts": lambda w, x: torch.matmul(x[:8].reshape(E, 2, N), w.permute(0, 2, 1)),
    "grouped_mm(x, w.mT)": lambda w, x: torch._grouped_mm(x, w.transpose(-2, -1), offs=OFFS),
    "grouped_mm(xT, w) transposed layout": lambda w, x: torch._grouped_mm(x[:, :4] @ torch.ones(4, M), w, offs=OFFS),
    "w[1:3] slice then bmm": lambda w, x: torch.bmm(w[1:3], x[:2].unsqueeze(-1)).squeeze(-1),
    "formed: einsum": lambda w, x: torch.einsum("emn,tn->tem", w, x),
    "formed: sum": lambda w, x: w.sum(0) @ x.T,
    "formed: index on the matrix dims": lambda w, x: w[:, :, 1:] @ x[:, 1:].T,
}
FORMED = {name for name in OPERATIONS if name.startswith("formed")}


def _factors(seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(E, M, N, generator=gen, dtype=dtype)
    left = torch.randn(E, M, 3, generator=gen, dtype=dtype).requires_grad_(True)
    right = torch.randn(E, 3, N, generator=gen, dtype=dtype).requires_grad_(True)
    x = torch.randn(9, N, generator=gen, dtype=dtype).requires_grad_(True)
    return weight, left, right, x


def _run(
    operation: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], low_rank: bool, seed: int, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    weight, left, right, x = _factors(seed, dtype)
    if low_rank:
        adapted: torch.Tensor = LowRankWeight.of(weight, [Term(left, right, 0.7)])
    else:
        adapted = weight + torch.matmul(left, right) * 0.7
    out = operation(adapted, x)
    assert type(out) is torch.Tensor  # the subclass never leaks into the layer's results
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=dtype))
    return out.detach(), left.grad, right.grad, x.grad  # type: ignore[return-value]


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_each_operation_equals_the_formed_weight(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Low-rank operations never call ``dense`` (it raises here); the others fall back to it."""
    dtype = torch.float32 if "grouped" in name else torch.float64  # the CPU grouped kernel takes no float64
    formed_calls: list[int] = []
    dense = LowRankWeight.dense

    def watched(self: LowRankWeight) -> torch.Tensor:
        if name not in FORMED:
            raise AssertionError(f"{name}: W + dW formed")
        formed_calls.append(1)
        return dense(self)

    monkeypatch.setattr(LowRankWeight, "dense", watched)
    fast, formed = _run(OPERATIONS[name], True, 0, dtype), _run(OPERATIONS[name], False, 0, dtype)
    assert bool(formed_calls) == (name in FORMED)
    weight, *_ = _factors(0, dtype)
    plain = OPERATIONS[name](weight, _factors(0, dtype)[3]).detach()
    assert_close(fast[0], formed[0], changed_from=plain, msg=name)
    for got, expected in zip(fast[1:], formed[1:]):
        assert_close(got, expected, msg=name)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), terms=st.integers(1, 3), transposed=st.booleans())
def test_stacked_terms_and_transposes(seed: int, terms: int, transposed: bool) -> None:
    """Several adapters' terms on one tensor (``of`` on a ``LowRankWeight`` adds to its terms), read through
    a transpose or not: the per-expert product equals the formed sum."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(E, M, N, generator=gen, dtype=torch.float64)
    adapted: torch.Tensor = weight
    formed = weight
    for k in range(terms):
        left = torch.randn(E, M, 2, generator=gen, dtype=torch.float64)
        right = torch.randn(E, 2, N, generator=gen, dtype=torch.float64)
        adapted = LowRankWeight.of(adapted, [Term(left, right, 0.5 + k)])
        formed = formed + torch.matmul(left, right) * (0.5 + k)
    assert isinstance(adapted, LowRankWeight)
    assert len(adapted._terms) == terms
    x = torch.randn(7, M if transposed else N, generator=gen, dtype=torch.float64)
    for e in range(E):
        got = x @ adapted[e] if transposed else F.linear(x, adapted[e])
        expected = x @ formed[e] if transposed else F.linear(x, formed[e])
        assert_close(
            got, expected, rtol=1e-12, atol=1e-12, changed_from=x @ weight[e] if transposed else F.linear(x, weight[e])
        )


def test_metadata_reads_the_weight() -> None:
    weight, left, right, _ = _factors(1, torch.float32)
    adapted = LowRankWeight.of(weight, [Term(left, right, 1.0)])
    facts = [adapted.shape, adapted.dtype, adapted.device, adapted.dim(), adapted.size(1), len(adapted)]
    assert facts == [weight.shape, weight.dtype, weight.device, 3, M, E]
    assert (adapted.stride(), adapted.data_ptr(), adapted.is_contiguous()) == (weight.stride(), weight.data_ptr(), True)
    assert [adapted[1].shape, adapted.mT.shape, adapted[1:3].shape] == [(M, N), (E, N, M), (2, M, N)]
    moved = adapted.to(torch.float64)
    assert isinstance(moved, LowRankWeight)
    assert moved.dtype == torch.float64
    assert_close(moved.dense(), (weight.double() + torch.matmul(left, right).double()).detach(), rtol=1e-6, atol=1e-6)
