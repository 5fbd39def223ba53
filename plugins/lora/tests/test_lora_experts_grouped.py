"""The grouped low-rank node (``grafting_lora.grouped_low_rank``) on expert tensors laid out as the adapter holds
them (``lora_B``'s expert ``e`` in columns ``e, e+E, …``): values and gradients equal the same products through
plain autograd ops (``L`` cast, ``R·s`` formed then cast, each relaid for the kernel), for bf16 and float32
inputs, any rank, frozen factors, and the ops it launches: two elementwise passes in forward and two in backward
besides the grouped GEMMs and the add into the base product."""

from __future__ import annotations

import collections
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from grafting.testing import assert_close
from grafting_lora.grouped_low_rank import grouped_low_rank, operand, takes
from grafting_lora.low_rank_weight import LowRankWeight
from grafting_lora.parameters import LoraFactors

IN, OUT = 16, 24  # each expert's matrix is (OUT, IN) (or (IN, OUT) transposed): 16-byte strides in bf16


def _offsets(experts: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
    """Cumulative group ends over ``tokens`` rows, expert 1 with no row."""
    counts = torch.randint(0, 4, (experts,), generator=gen)
    counts[1] = 0
    counts[-1] += tokens - counts.sum().clamp(max=tokens) if counts.sum() < tokens else 0
    ends = counts.cumsum(0).clamp(max=tokens)
    ends[-1] = tokens
    return ends.to(torch.int32)


def _setup(seed: int, experts: int, r: int, transposed: bool, dtype: torch.dtype) -> tuple[Any, ...]:
    """Random weights, factors, input and output gradient. In bf16 they are small integers and the scaling a
    power of two: every product and sum is exact, so kernels summing in another order give the same bits."""
    gen = torch.Generator().manual_seed(seed)
    exact = dtype == torch.bfloat16

    def sample(*shape: int) -> torch.Tensor:
        return torch.randint(-1, 2, shape, generator=gen).float() if exact else torch.randn(shape, generator=gen)

    shape = (experts, IN, OUT) if transposed else (experts, OUT, IN)
    weight = sample(*shape).to(dtype)
    level = LoraFactors(shape, r, 0.25 if exact else 0.37 + seed % 5, False, transposed)
    with torch.no_grad():
        level.lora_A.weight.copy_(sample(*level.lora_A.weight.shape))
        level.lora_B.weight.copy_(sample(*level.lora_B.weight.shape))
    tokens = 11
    x = sample(tokens, IN).to(dtype).requires_grad_(True)
    grad = sample(tokens, OUT).to(dtype)
    return weight, level, x, _offsets(experts, tokens, gen), grad


def _mat_b(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The expert tensor as transformers' grouped experts hand it to the kernel: (E, in, out)."""
    return weight if transposed else weight.transpose(-2, -1)


def _plain(weight: torch.Tensor, level: LoraFactors, x: torch.Tensor, offs: torch.Tensor, transposed: bool) -> Any:
    """The reference: the same low-rank products through plain autograd ops, each factor copied row-major (or
    column-major where its rows are narrower than 16 bytes)."""
    left, right = LowRankWeight.of(weight, [level.term()])._terms[0].factors(x.dtype)
    if not transposed:
        left, right = right.mT, left.mT
    base = torch._grouped_mm(x, _mat_b(weight, transposed), offs=offs)
    h = torch._grouped_mm(x, _relaid(left), offs=offs)
    return base + torch._grouped_mm(h, _relaid(right), offs=offs)


def _relaid(matrix: torch.Tensor) -> torch.Tensor:
    if matrix.shape[-1] * matrix.element_size() % 16:
        return matrix.mT.contiguous().mT
    return matrix.contiguous()


def _grads(out: torch.Tensor, grad: torch.Tensor, *leaves: torch.Tensor) -> list[torch.Tensor | None]:
    return list(torch.autograd.grad(out, [t for t in leaves if t.requires_grad], grad, allow_unused=True))


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    experts=st.integers(2, 5),
    r=st.sampled_from([1, 3, 4, 8, 16]),
    transposed=st.booleans(),
    bf16=st.booleans(),
    frozen=st.sampled_from(["none", "A", "B", "x"]),
)
def test_node_equals_plain_autograd(seed: int, experts: int, r: int, transposed: bool, bf16: bool, frozen: str) -> None:
    """Values and gradients of ``x``, ``lora_A`` and ``lora_B`` (each asked for or not) equal plain autograd's."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    weight, level, x, offs, grad = _setup(seed, experts, r, transposed, dtype)
    frozen_param = {"A": level.lora_A.weight, "B": level.lora_B.weight, "x": x}.get(frozen)
    if frozen_param is not None:
        frozen_param.requires_grad_(False)
    leaves = (x, level.lora_A.weight, level.lora_B.weight)
    expected = _plain(weight, level, x, offs, transposed)
    expected_grads = _grads(expected, grad, *leaves)
    adapted = LowRankWeight.of(weight, [level.term()])
    actual = torch._grouped_mm(x, _mat_b(adapted, transposed), offs=offs)
    assert type(actual) is torch.Tensor
    actual_grads = _grads(actual, grad, *leaves)
    plain = torch._grouped_mm(x.detach(), _mat_b(weight, transposed), offs=offs)
    assert_close(actual.detach(), expected.detach(), changed_from=plain)
    assert_close(actual_grads, expected_grads)
    for got, leaf in zip(actual_grads, [t for t in leaves if t.requires_grad], strict=True):
        assert got is not None
        assert (got.dtype, got.shape) == (leaf.dtype, leaf.shape)


def test_without_autograd_equals_the_node() -> None:
    """No gradient wanted: plain ops, the same values as the node's forward."""
    _weight, level, x, offs, _ = _setup(3, 4, 4, False, torch.bfloat16)
    left, right = level.term().views()
    left, right = right.mT, left.mT
    with_node = grouped_low_rank(x, left, right, offs, level.scaling)
    with torch.no_grad():
        without = grouped_low_rank(x, left, right, offs, level.scaling)
    assert with_node.grad_fn is not None
    assert without.grad_fn is None
    assert_close(without, with_node.detach())


def test_operand_layouts() -> None:
    """Each factor reaches the kernel in one pass, in a layout it takes; one that already does is used as it is."""
    a = torch.randn(4 * 16, 32)  # lora_A: (experts·r, in)
    b = torch.randn(24, 16 * 4)  # lora_B: (out, r·experts), expert e in columns e, e+4, …
    left = a.reshape(4, 16, 32).mT  # (E, in, r): column-major, taken as it is
    right = b.reshape(24, 16, 4).permute(2, 0, 1).mT  # (E, r, out): no dim contiguous
    assert takes(left)
    assert not takes(right)
    assert operand(left, torch.float32) is left
    for matrix, scaling in ((left, None), (right, 0.3), (left[..., :4], None)):
        made = operand(matrix, torch.bfloat16, scaling)
        assert takes(made)
        expected = matrix if scaling is None else matrix * scaling
        assert torch.equal(made, expected.to(torch.bfloat16))


class Ops(TorchDispatchMode):
    """Counts the aten ops that do work (views and allocations left out)."""

    VIEWS = frozenset({"view", "t", "transpose", "permute", "expand", "slice", "select", "detach", "alias"})

    def __init__(self) -> None:
        super().__init__()
        self.count: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name not in self.VIEWS and not name.startswith(("empty", "_reshape_alias", "_unsafe_view")):
            self.count[name] += 1
        return func(*args, **(kwargs or {}))


def test_passes_besides_the_products() -> None:
    """bf16 input, float32 factors in the adapter's layout: forward casts ``L``, scales and casts ``R`` and adds
    into the base product (three passes); backward writes each factor's gradient in one pass and autograd adds
    the two input gradients (three) -- the plain autograd path takes ten."""
    weight, level, x, offs, grad = _setup(1, 4, 16, False, torch.bfloat16)
    adapted = LowRankWeight.of(weight, [level.term()])
    with Ops() as forward:
        out = torch._grouped_mm(x, adapted.transpose(-2, -1), offs=offs)
    with Ops() as backward:
        out.backward(grad)
    assert forward.count.pop("_grouped_mm") == 3
    assert backward.count.pop("_grouped_mm") == 5
    assert sum(forward.count.values()) == 3, forward.count
    assert sum(backward.count.values()) == 3, backward.count
    assert level.lora_B.weight.grad is not None
    assert level.lora_B.weight.grad.stride() == level.lora_B.weight.stride()
