"""OFT's rotations and layer adapters: PEFT's formulas, the fast paths against the rotated-weight reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from oft_helpers import F64
from peft.tuners.oft.layer import OFTLayer, OFTRotationModule
from torch import nn

from grafting import ConfigError
from grafting.model.layer import LayerCall
from grafting.testing import assert_close, assert_identical
from grafting_oft import OFTConv2d, OFTEmbedding, OFTLinear, OFTRotation
from grafting_oft.rotation import constrain, nearest_divisor, skew

TIGHT = {"rtol": 1e-10, "atol": 1e-10}


def _rotation(blocks: int, size: int, seed: int = 0, **options: object) -> OFTRotation:
    rotation = OFTRotation(blocks, size, init_weights=False, **options).to(F64)  # type: ignore[arg-type]
    with torch.no_grad():
        rotation.weight.copy_(torch.randn(rotation.weight.shape, generator=torch.Generator().manual_seed(seed)) * 0.4)
    return rotation


def _peft_module(rotation: OFTRotation, n: int) -> OFTRotationModule:
    module = OFTRotationModule(
        rotation.weight.shape[0],
        rotation.weight.shape[1],
        rotation.size,
        n,
        coft=rotation.coft,
        eps=rotation.eps,
        block_share=rotation.weight.shape[0] == 1 and rotation.blocks > 1,
        use_cayley_neumann=rotation.neumann_terms is not None,
        num_cayley_neumann_terms=rotation.neumann_terms or 5,
    ).to(F64)
    module.weight.data.copy_(rotation.weight.detach())
    return module


@given(size=st.integers(2, 7), terms=st.one_of(st.none(), st.integers(1, 8)), seed=st.integers(0, 99))
def test_blocks_are_peft_cayley_and_its_neumann_series(size: int, terms: int | None, seed: int) -> None:
    rotation = _rotation(3, size, seed, neumann_terms=terms)
    peft_module = _peft_module(rotation, 3 * size)
    expected = peft_module._cayley_batch(peft_module.weight, size, terms is not None, terms or 5)
    assert_close(rotation.matrices(), expected, **TIGHT)
    if terms is None:  # the exact transform is orthogonal
        eye = torch.eye(size, dtype=F64).expand(3, size, size)
        assert_close(rotation.matrices() @ rotation.matrices().transpose(1, 2), eye, **TIGHT)


@given(size=st.integers(2, 6), eps=st.sampled_from([1e-3, 0.1, 10.0]), seed=st.integers(0, 99))
def test_coft_projection_is_peft_s(size: int, eps: float, seed: int) -> None:
    rotation = _rotation(4, size, seed, coft=True, eps=eps)
    expected = _peft_module(rotation, 4 * size)._project_batch(rotation.weight.detach(), eps=eps)
    assert_close(constrain(rotation.weight.detach(), eps, size), expected, **TIGHT)
    q = skew(constrain(rotation.weight.detach(), eps, size), rotation.rows, rotation.cols, size)
    assert float(q.flatten(1).norm(dim=1).max()) <= eps / 2 * (1 + 1e-6)


@given(n=st.integers(1, 300), wanted=st.integers(1, 400))
def test_block_sizes_are_adjusted_as_peft_adjusts_them(n: int, wanted: int) -> None:
    assert nearest_divisor(n, wanted) == OFTLayer.adjust_oft_parameters(None, n, wanted)  # type: ignore[arg-type]


def _params(adapter: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return [x, *adapter.parameters()]


def _agree(actual: torch.Tensor, expected: torch.Tensor, params: list[torch.Tensor]) -> None:
    grad_out = torch.randn_like(expected)
    assert_close(actual, expected, **TIGHT, msg="value")
    for got, want in zip(
        torch.autograd.grad(actual, params, grad_out),
        torch.autograd.grad(expected, params, grad_out, retain_graph=True),
    ):
        assert_close(got, want, **TIGHT, msg="gradient")


@given(
    blocks=st.integers(1, 4),
    size=st.integers(1, 5),
    n_out=st.integers(1, 9),
    share=st.booleans(),
    terms=st.sampled_from([None, 3, 5]),
    seed=st.integers(0, 99),
)
def test_linear_rotates_its_input_as_the_rotated_weight_would(
    blocks: int, size: int, n_out: int, share: bool, terms: int | None, seed: int
) -> None:
    torch.manual_seed(seed)
    base = nn.Linear(blocks * size, n_out).to(F64)
    adapter = OFTLinear(_rotation(blocks, size, seed, share=share, neumann_terms=terms))
    x = torch.randn(2, 3, blocks * size, dtype=F64, requires_grad=True)
    reference = F.linear(x, base.weight @ adapter.oft_R.matrix().T, base.bias)  # W' = W·Rᵀ
    _agree(base(adapter(x)), reference, _params(adapter, x))


def test_embedding_rotates_each_looked_up_vector() -> None:
    base = nn.Embedding(10, 6).to(F64)
    adapter = OFTEmbedding(_rotation(2, 3, 1))
    ids = torch.tensor([[1, 4, 9], [0, 0, 3]])
    reference = F.embedding(ids, base.weight @ adapter.oft_embedding_R.matrix())  # E' = E·R
    params = list(adapter.parameters())
    _agree(adapter(base(ids)), reference, params)


CONVS = {
    "1x1": (nn.Conv2d(4, 5, 1), (2, 4, 5, 5)),
    "3x3 padded": (nn.Conv2d(2, 3, 3, padding=1), (2, 2, 6, 6)),
    "3x3 strided reflect": (nn.Conv2d(2, 4, 3, stride=2, padding=1, padding_mode="reflect"), (1, 2, 7, 7)),
}


@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv_runs_with_the_rotated_kernel_alone_and_as_a_delta(name: str) -> None:
    torch.manual_seed(2)
    base, shape = CONVS[name]
    base = base.to(F64)
    n = base.weight[0].numel()
    adapter = OFTConv2d(_rotation(n // 2, 2, 3))
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    rotated = (base.weight.flatten(1) @ adapter.oft_R.matrix().T).reshape(base.weight.shape)
    reference = base._conv_forward(x, rotated, base.bias)
    params = _params(adapter, x)
    _agree(adapter.fused_call(base, x), reference, params)
    composed = base(x) + adapter(x, LayerCall(base, (x,), {}, base(x)))
    _agree(composed, reference, params)


def test_a_fresh_adapter_is_exactly_the_identity() -> None:
    x = torch.randn(4, 8, dtype=F64)
    for terms in (None, 5):
        rotation = OFTRotation(2, 4, neumann_terms=terms).to(F64)
        assert torch.count_nonzero(rotation.weight) == 0
        assert_identical(OFTLinear(rotation)(x), x)


def test_module_dropout_puts_identity_blocks_in_training_only() -> None:
    rotation = _rotation(10, 3, 4, dropout=0.3)
    eye = torch.eye(3, dtype=F64)
    rotation.eval()
    full = rotation.matrices()
    assert not any(torch.equal(block, eye) for block in full)
    rotation.train()
    for seed in range(3):
        torch.manual_seed(seed)
        blocks = rotation.matrices()
        identity = [torch.equal(block, eye) for block in blocks]
        assert sum(identity) == 3  # int(0.3 · 10) blocks, as PEFT's multiplicative dropout
        for block, kept, original in zip(blocks, identity, full):
            assert kept or torch.equal(block, original)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input_rotates_in_its_own_dtype_by_default(dtype: torch.dtype) -> None:
    adapter = OFTLinear(_rotation(4, 8, 5).float())
    x = torch.randn(6, 32).to(dtype)
    reference = x.double() @ adapter.oft_R.matrix().detach().double()
    for precision in ("input", "adapter"):
        adapter.precision = precision
        assert adapter.compute_dtype(x) == (dtype if precision == "input" else torch.float32)
        out = adapter(x)
        assert out.dtype == dtype
        error = float((out.detach().double() - reference).norm() / reference.norm())
        assert error < 1e-2, f"{precision}: relative error {error:.3g}"
    with pytest.raises(ConfigError, match="precision must be one of"):
        adapter.precision = "half"  # type: ignore[assignment]


@pytest.mark.parametrize("kind", ["linear", "embedding", "conv"])
def test_merge_rounds_the_rotated_weight_once_and_unmerge_restores_its_bits(kind: str) -> None:
    torch.manual_seed(6)
    if kind == "linear":
        base: nn.Module = nn.Linear(16, 12).to(torch.bfloat16)
        adapter: nn.Module = OFTLinear(_rotation(4, 4, 7).float())
        exact = base.weight.double() @ adapter.oft_R.matrix().double().T
    elif kind == "embedding":
        base = nn.Embedding(12, 16).to(torch.bfloat16)
        adapter = OFTEmbedding(_rotation(4, 4, 7).float())
        exact = base.weight.double() @ adapter.oft_embedding_R.matrix().double()
    else:
        base = nn.Conv2d(2, 12, 2).to(torch.bfloat16)
        adapter = OFTConv2d(_rotation(2, 4, 7).float())
        exact = (base.weight.flatten(1).double() @ adapter.oft_R.matrix().double().T).reshape(base.weight.shape)
    before = base.weight.detach().clone()
    adapter.merge(base)
    merged = base.weight.detach().double()
    ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)  # bfloat16: 8 significant bits
    assert float(((merged - exact).abs() / ulp).max()) <= 0.51, "more than half a bfloat16 step from the exact value"
    assert not torch.equal(base.weight, before)
    adapter.unmerge(base)
    assert_identical(base.weight.detach(), before)
