"""Cases of :mod:`test_lora_dropout_kernels`, run by it in a child process (not collected here).

Triton decorates its kernels, and its own library, for the interpreter or the GPU compiler when
first imported, by ``TRITON_INTERPRET``: one process cannot hold both. The parent runs these
once with ``TRITON_INTERPRET=1`` (no GPU: the kernel cases, through the interpreter) and once
without (the compile case). The interpreter computes bfloat16 as raw bits (its products and casts
of bf16 are wrong), so on the CPU the half precision checked is float16; with a GPU both are.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch
from torch import nn

from grafting.model.layer import AdaptedLayer
from grafting.testing import assert_close, assert_identical
from grafting_lora import dropout_kernels
from grafting_lora.dropout_kernels import LoraDropoutFunction, draw_seed, keep_mask, keep_rule
from grafting_lora.fused import lora_products
from grafting_lora.layers import LoraLinear

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
HALF = [torch.float16, torch.bfloat16] if GPU else [torch.float16]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _formula(x, weight, bias, a, b, scaling, p, keep):  # type: ignore[no-untyped-def]
    """The torch node's computation (:class:`~grafting_lora.fused.LoraLinearFunction`) with the mask given."""
    h = torch.ops.aten.native_dropout_backward(x, keep, keep_rule(p)[1])  # x ⊙ keep·scale, as dropout writes it
    y, _ = lora_products(x, h, weight, bias, a.to(x.dtype), b.to(x.dtype), scaling)
    return y


def _close(
    actual: torch.Tensor | list,
    expected: torch.Tensor | list,
    half: torch.dtype = torch.float16,
    changed_from: torch.Tensor | None = None,
) -> None:
    """:func:`assert_close` with room for roundings in half precision, whatever the result's dtype.

    Both sides compute in half precision (A's and B's float32 gradients too), rounding ``d(x)·Aᵀ``
    and the gradient products after summing in different orders: a last-bit difference there
    moves a result by up to an ulp of its largest values (atol: 2 eps of the largest magnitude,
    eps of ``half``), on top of a relative tolerance of one eps.
    """
    if isinstance(actual, list):
        for a, e in zip(actual, expected, strict=True):
            _close(a, e, half)
        return
    eps = torch.finfo(half).eps
    atol = 2 * eps * expected.abs().max().item()
    assert_close(actual, expected, atol=atol, rtol=eps)
    if changed_from is not None:  # a no-op adapter must fail the comparison by far
        # (assert_close's own changed_from asks 0.5/eps tolerances: more than this atol, at 2·eps of the largest
        # value, can give in bfloat16; an H100 run measured 43.5 of 64)
        effect = (expected.float() - changed_from.float()).abs().max().item()
        assert effect > 10 * (atol + eps * expected.abs().max().item()), (effect, atol)


def _inputs(m: int, k: int, r: int, out: int, dtype: torch.dtype, bias: bool) -> list:
    gen = torch.Generator().manual_seed(m * 1000 + k + r)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(out, k, generator=gen) / k**0.5).to(DEVICE, dtype)
    b0 = torch.randn(out, generator=gen).to(DEVICE, dtype) if bias else None
    a = (torch.randn(r, k, generator=gen) / k**0.5).to(DEVICE)
    b = torch.randn(out, r, generator=gen).to(DEVICE)
    return [x, weight, b0, a, b]


SHAPES = [  # (tokens, in, r, out, p): edges in every dimension, a rank to pad, several row shares
    (70, 100, 5, 30, 0.05),
    (200, 64, 16, 16, 0.5),
    (33, 130, 20, 7, 0.3),
]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(("m", "k", "r", "out", "p"), SHAPES)
def test_values_and_gradients_equal_the_formula_with_the_kernels_mask(
    m: int, k: int, r: int, out: int, p: float, dtype: torch.dtype
) -> None:
    """Output and the gradients of x, W, bias, A, B equal the torch node's with the mask :func:`keep_mask` draws."""
    inputs = _inputs(m, k, r, out, dtype, bias=r != 16)
    leaves = [t.requires_grad_(True) if t is not None else None for t in inputs]
    torch.manual_seed(11)
    y = LoraDropoutFunction.apply(*leaves[:5], 1.5, p)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], upstream)

    torch.manual_seed(11)  # the same draw: the seed the node took
    seed, offset = draw_seed(torch.device(DEVICE))
    keep = keep_mask(m, k, p, seed, offset, DEVICE)
    assert 0 < keep.sum() < keep.numel()
    y_ref = _formula(*leaves[:5], 1.5, p, keep)
    grads_ref = torch.autograd.grad(y_ref, [t for t in leaves if t is not None], upstream)
    with torch.no_grad():
        base = _formula(leaves[0], leaves[1], leaves[2], leaves[3] * 0, leaves[4], 1.5, p, keep)
    _close(y, y_ref, dtype, changed_from=base)
    assert [g.dtype for g in grads] == [t.dtype for t in leaves if t is not None]
    _close(list(grads), list(grads_ref), dtype)
    dropped = ~keep  # the adapter's part of x's gradient is zero where x was dropped
    _close(grads[0][dropped], (upstream @ leaves[1])[dropped], dtype)


@pytest.mark.parametrize(("needs_x", "needs_a"), [(True, False), (False, True), (False, False)])
def test_only_the_gradients_asked_for_are_computed(needs_x: bool, needs_a: bool) -> None:
    """A frozen A or an input without gradient: the kernel skips that half; the rest is unchanged."""
    dtype = torch.float16
    x, weight, bias, a, b = _inputs(70, 100, 5, 30, dtype, bias=True)
    x.requires_grad_(needs_x)
    a.requires_grad_(needs_a)
    b.requires_grad_(True)
    torch.manual_seed(5)
    y = LoraDropoutFunction.apply(x, weight, bias, a, b, 2.0, 0.3)
    asked = [t for t in (x, a, b) if t.requires_grad]
    grads = torch.autograd.grad(y.square().sum(), asked)
    torch.manual_seed(5)
    seed, offset = draw_seed(torch.device(DEVICE))
    y_ref = _formula(x, weight, bias, a, b, 2.0, 0.3, keep_mask(70, 100, 0.3, seed, offset, DEVICE))
    _close(y, y_ref)
    _close(list(grads), list(torch.autograd.grad(y_ref.square().sum(), asked)))


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_the_keep_rate_is_one_minus_p_in_every_lane(p: float) -> None:
    """Over 512×1000 draws each of the eight 16-bit lanes of a Philox block keeps 1-p, neighbours independently."""
    keep = keep_mask(512, 1000, p, 1234, 0, DEVICE).float().cpu()
    for lane in range(8):
        rate = keep[:, lane::8].mean().item()
        sigma = (p * (1 - p) / keep[:, lane::8].numel()) ** 0.5
        assert abs(rate - (1 - p)) < 5 * sigma, (lane, rate)
    both = (keep[:, 1:] * keep[:, :-1]).mean().item()  # P(two neighbours kept) = (1-p)²
    assert abs(both - (1 - p) ** 2) < 5 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / keep[:, 1:].numel()) ** 0.5


def test_masks_differ_by_seed_and_offset_and_depend_only_on_the_position() -> None:
    """Another seed or offset draws another mask; an element's draw does not depend on the input's shape."""
    m, k, p = 130, 70, 0.5
    first = keep_mask(m, k, p, 7, 0, DEVICE)
    assert (first != keep_mask(m, k, p, 8, 0, DEVICE)).float().mean() > 0.4
    assert (first != keep_mask(m, k, p, 7, 4, DEVICE)).float().mean() > 0.4
    assert (first != keep_mask(m, k, p, 7, 1 << 32, DEVICE)).float().mean() > 0.4  # the offset's high word
    assert_identical(keep_mask(5, 17, p, 7, 0, DEVICE), first[:5, :17])


def test_each_call_draws_a_fresh_mask_and_a_seed_repeats_it() -> None:
    """Two calls in a row drop different elements; ``torch.manual_seed`` gives the same output again."""
    x, weight, bias, a, b = _inputs(64, 64, 4, 8, torch.float16, bias=False)
    torch.manual_seed(3)
    first = LoraDropoutFunction.apply(x, weight, bias, a, b, 1.0, 0.5)
    second = LoraDropoutFunction.apply(x, weight, bias, a, b, 1.0, 0.5)
    torch.manual_seed(3)
    again = LoraDropoutFunction.apply(x, weight, bias, a, b, 1.0, 0.5)
    assert not torch.equal(first, second)
    assert_identical(again, first)


def _layer(dtype: torch.dtype, p: float) -> AdaptedLayer:
    torch.manual_seed(0)
    base = nn.Linear(24, 20).to(DEVICE, dtype).requires_grad_(False)
    layer = AdaptedLayer(base)
    layer.add_adapter("a", LoraLinear(base, 4, 1.5, dropout=p, init=False).to(DEVICE))
    layer.set_active(["a"])
    return layer.train()


def test_the_layer_takes_the_kernels_where_they_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where :func:`serves` (CUDA), the layer's node is the Triton one; its output is the formula's."""
    monkeypatch.setattr(dropout_kernels, "serves", lambda x, a: True)
    layer = _layer(torch.float16, 0.3)
    x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(2)).to(DEVICE, torch.float16)
    torch.manual_seed(4)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "LoraDropoutFunctionBackward"
    torch.manual_seed(4)
    seed, offset = draw_seed(x.device)
    adapter, base = layer.adapters["a"], layer.base_layer
    keep = keep_mask(10, 24, 0.3, seed, offset, DEVICE)
    flat = x.reshape(10, 24)
    expected = _formula(flat, base.weight, base.bias, adapter.lora_A.weight, adapter.lora_B.weight, 1.5, 0.3, keep)
    _close(y.reshape(10, 20), expected, changed_from=base(flat))


def test_every_kernel_compiles_for_an_h100() -> None:
    """Each kernel and gradient variant, in its first autotuned tile, compiles to an sm_90 binary (no GPU).

    What the interpreter does not check: the frontend's typing, layouts and globals (Triton's bundled
    ptxas; the other tiles compile too, but take ~10 s each on a small CPU).
    """
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    assert not INTERPRETED, "the compile case runs without TRITON_INTERPRET"
    module = importlib.import_module("grafting_lora._dropout_triton")
    target = GPUTarget("cuda", 90, 32)
    draw = {"seed": "i64", "offset": "i64", "threshold": "i32"}
    shape = {"M": "i32", "K": "i32", "R": "i32", "M_BUCKET": "i32", "stride_x": "i32", "stride_a": "i32"}

    def build(fn: object, signature: dict, constants: dict, config: object = None) -> None:
        options = {} if config is None else {"num_warps": config.num_warps, "num_stages": config.num_stages}
        constants = constants if config is None else {**constants, **config.kwargs}
        signature = {**signature, **dict.fromkeys(constants, "constexpr")}
        binary = triton_compile(ASTSource(fn, signature, constants), target=target, options=options)
        assert binary.asm["cubin"]

    mask_signature = {"out_ptr": "*i8", "M": "i32", "K": "i32", **draw}
    build(module.keep_mask_kernel, mask_signature, {"BM": 128, "BK": 128})
    down = module.dropped_down_kernel
    down_signature = {"x_ptr": "*bf16", "a_ptr": "*fp32", "low_ptr": "*bf16", **shape, **draw, "scale": "fp32"}
    build(down.fn, down_signature, {"RP": 32}, down.configs[0])
    up = module.dropped_up_kernel
    for want_x, want_a in [(True, True), (True, False), (False, True)]:
        outputs = {"grad_x_ptr": "*bf16", "grad_a_ptr": "*fp32"}
        constants: dict = {"WANT_X": want_x, "WANT_A": want_a, "RP": 16}
        for name, wanted in (("grad_x_ptr", want_x), ("grad_a_ptr", want_a)):
            if not wanted:
                del outputs[name]
                constants[name] = None
        signature = {"x_ptr": "*bf16", "grad_low_ptr": "*bf16", "a_ptr": "*fp32", **outputs, **shape}
        signature |= {"rows_per_split": "i32", **draw, "scale": "fp32"}
        build(up.fn, signature, constants, up.configs[0])


def test_a_llama_training_step_runs_through_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every LoRA projection of a tiny Llama takes the Triton node in a training step; every A gets a gradient."""
    import grafting
    from grafting.testing import tiny_llama

    taken: list[tuple[int, ...]] = []

    def serves(x: torch.Tensor, lora_a: torch.Tensor) -> bool:
        taken.append(tuple(x.shape))
        return True

    monkeypatch.setattr(dropout_kernels, "serves", serves)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = grafting.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=targets, init_lora_weights=False)
    model = grafting.get_peft_model(tiny_llama(layers=1).to(DEVICE, torch.float16), config).train()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(taken) == len(targets)
    for name, param in model.named_parameters():
        if "lora_A" in name:
            assert param.grad is not None, name
            assert torch.isfinite(param.grad).all(), name
            assert param.grad.abs().sum() > 0, name
