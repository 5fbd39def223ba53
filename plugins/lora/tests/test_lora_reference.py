"""Every LoRA fast path computes its reference (grafting_lora.reference): values and gradients.

Each fast path is called directly in float32, bfloat16 and float16 and compared with the
reference function evaluated in float64 on the same rounded inputs, within a few roundings
of the dtype the fast path computes in; the layer-level checks (the fast paths as the layer
takes them, against ``fused = False``) are in test_lora_fast_path.py and below.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from dora_helpers import dora_kernels_on
from torch import nn

from grafting.model.layer import AdaptedLayer
from grafting.testing import assert_close
from grafting_lora.dora_node import DoraLinearFunction, dora_linear, dora_norm_squared
from grafting_lora.fused import LoraLinearFunction, lora_linear
from grafting_lora.layers import LoraLinear
from grafting_lora.reference import (
    delta_weight,
    dora_delta,
    dora_merge,
    dora_norm,
    dora_scale,
    dora_unmerge,
    grouped_low_rank_add,
    lora_delta,
    low_rank,
    low_rank_add,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SCALING = 1.5
Tensors = dict[str, torch.Tensor]


def _inputs(dtype: torch.dtype, seed: int = 0) -> Tensors:
    """A (3, 5, 24) input, a (20, 24) layer with bias in ``dtype``; float32 factors of rank 4 and a magnitude."""
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(3, 5, 24, generator=g).to(dtype),
        "w": (torch.randn(20, 24, generator=g) / 5).to(dtype),
        "bias": torch.randn(20, generator=g).to(dtype),
        "a": torch.randn(4, 24, generator=g) / 5,
        "b": torch.randn(20, 4, generator=g) * 2,
        "m": torch.rand(20, generator=g) + 1.0,
    }


def _base_layer(t: Tensors) -> torch.Tensor:
    return F.linear(t["x"], t["w"], t["bias"])


def _lora_layer(t: Tensors) -> torch.Tensor:
    """The reference layer ``base(x) + lora_delta(x)``, in the inputs' dtype."""
    return F.linear(t["x"], t["w"], t["bias"]) + lora_delta(t["x"], t["a"], t["b"], SCALING)


def _dora_layer(t: Tensors) -> torch.Tensor:
    """The reference DoRA layer ``base(x) + dora_delta``, in the inputs' dtype."""
    base = F.linear(t["x"], t["w"])
    scale = dora_scale(t["m"], t["w"], delta_weight(t["a"], t["b"], SCALING))
    return base + t["bias"] + dora_delta(base, low_rank(t["x"], t["a"], t["b"]), scale, SCALING)


def _compare(
    fast: Callable[[Tensors], torch.Tensor],
    reference: Callable[[Tensors], torch.Tensor],
    dtype: torch.dtype,
    grads: tuple[str, ...],
    base_of: Callable[[Tensors], torch.Tensor] | None = None,
) -> None:
    """``fast`` on the inputs in ``dtype`` against ``reference`` in float64: output and the gradients named.

    ``base_of`` gives the base layer's output (default: the one linear layer on the whole input).
    """
    inputs = _inputs(dtype)
    runs = []
    for fn, tensors in ((fast, inputs), (reference, {k: v.double() for k, v in inputs.items()})):
        leaves = {k: v.detach().requires_grad_(k in grads) for k, v in tensors.items()}
        out = fn(leaves)
        if grads:
            upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
            (out * upstream).sum().backward()
        runs.append((out.detach(), {k: leaves[k].grad for k in grads}))
    (out, got), (ref_out, ref_grads) = runs
    assert out.dtype == dtype
    eps = torch.finfo(dtype).eps
    with torch.no_grad():
        base = (base_of or _base_layer)({k: v.double() for k, v in inputs.items()})

    def close(actual: torch.Tensor, expected: torch.Tensor, msg: str, **moved: torch.Tensor) -> None:
        """Within a few roundings of ``dtype``: 8 relative to the entry, 4 relative to the largest entry."""
        expected = expected.to(actual.dtype)
        scale = expected.abs().max().item()
        assert_close(actual, expected, rtol=8 * eps, atol=4 * eps * scale, msg=msg, **moved)

    close(out, ref_out, "output", changed_from=base.to(dtype))
    for name in grads:
        assert got[name] is not None, name
        close(got[name], ref_grads[name], name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_addmm_accumulation_is_lora_delta(dtype: torch.dtype) -> None:
    def fast(t: Tensors) -> torch.Tensor:
        y = F.linear(t["x"], t["w"], t["bias"])
        return low_rank_add(y, t["x"], t["a"].to(dtype), (t["b"] * SCALING).to(dtype))

    _compare(fast, _lora_layer, dtype, ("x", "a", "b", "bias"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_one_node_lora_layer_is_base_plus_lora_delta(dtype: torch.dtype) -> None:
    def fast(t: Tensors) -> torch.Tensor:
        return LoraLinearFunction.apply(t["x"], t["w"], t["bias"], t["a"], t["b"], SCALING, 0.0)

    _compare(fast, _lora_layer, dtype, ("x", "a", "b", "bias"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_inference_lora_ops_are_base_plus_lora_delta(dtype: torch.dtype) -> None:
    def fast(t: Tensors) -> torch.Tensor:
        with torch.no_grad():
            return lora_linear(t["x"], t["w"], t["bias"], t["a"], t["b"], SCALING)

    _compare(fast, _lora_layer, dtype, ())


@pytest.mark.parametrize("kernels", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_one_node_dora_layer_is_base_plus_dora_delta(dtype: torch.dtype, kernels: bool) -> None:
    """With DoRA's Triton kernels (interpreted) or their torch ops."""

    def fast(t: Tensors) -> torch.Tensor:
        w = t["w"]
        squares = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32).square()
        return DoraLinearFunction.apply(t["x"], w, t["bias"], t["a"], t["b"], t["m"], squares, SCALING)

    with dora_kernels_on(kernels):
        _compare(fast, _dora_layer, dtype, ("x", "a", "b", "m", "bias"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_inference_dora_ops_are_base_plus_dora_delta(dtype: torch.dtype) -> None:
    def fast(t: Tensors) -> torch.Tensor:
        w = t["w"]
        with torch.no_grad():
            squares = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32).square()
            norm = dora_norm_squared(w, squares, t["a"], t["b"], SCALING).sqrt()
            out = dora_linear(t["x"], w, t["bias"], t["a"], t["b"], t["m"] / norm, SCALING)
        return out

    _compare(fast, _dora_layer, dtype, ())


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_skinny_row_norm_is_dora_norm(dtype: torch.dtype) -> None:
    t = _inputs(dtype)
    w = t["w"]
    squares = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32).square()
    fast = dora_norm_squared(w, squares, t["a"], t["b"], SCALING).sqrt()
    exact = dora_norm(w.double(), delta_weight(t["a"].double(), t["b"].double(), SCALING))
    eps = torch.finfo(dtype).eps  # only the cross term W·Aᵀ is rounded to the weight's dtype
    assert fast.dtype == torch.float32
    assert_close(fast, exact.float(), rtol=2 * eps, atol=0.0, changed_from=torch.linalg.vector_norm(w.float(), dim=1))


def _samples(t: Tensors) -> torch.Tensor:
    """The input as five samples of three positions."""
    return t["x"].reshape(15, 24).reshape(5, 3, 24)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_gathered_product_is_each_samples_lora_delta(dtype: torch.dtype) -> None:
    """Three adapters of ranks 2, 3, 4 and a sample without one: each sample gets its own adapter's delta."""
    slots = torch.tensor([1, 3, 0, 2, 1])
    ranks = (2, 3, 4)

    def factors(t: Tensors) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(t["a"][:r] * (k + 1), t["b"][:, :r] / (k + 1)) for k, r in enumerate(ranks)]

    def fast(t: Tensors) -> torch.Tensor:
        pairs = factors(t)
        stack_a = torch.stack([F.pad(a, (0, 0, 0, 4 - a.shape[0])) for a, _ in pairs] + [torch.zeros_like(t["a"])])
        stack_b = torch.stack([F.pad(b, (0, 4 - b.shape[1])) * SCALING for _, b in pairs] + [torch.zeros_like(t["b"])])
        x = _samples(t)
        return grouped_low_rank_add(F.linear(x, t["w"], t["bias"]), x, slots, stack_a.to(dtype), stack_b.to(dtype))

    def reference(t: Tensors) -> torch.Tensor:
        pairs = factors(t)
        x = _samples(t)
        rows = []
        for i, slot in enumerate(slots.tolist()):
            y = F.linear(x[i], t["w"], t["bias"])
            rows.append(y if slot == len(pairs) else y + lora_delta(x[i], *pairs[slot], SCALING))
        return torch.stack(rows)

    def base_of(t: Tensors) -> torch.Tensor:
        return F.linear(_samples(t), t["w"], t["bias"])

    _compare(fast, reference, dtype, ("x", "a", "b"), base_of)
    with torch.no_grad():  # the sample routed to no adapter is the base layer's output
        t = _inputs(dtype)
        assert_close(fast(t)[1], base_of(t)[1])


def test_the_dora_merge_is_undone_by_the_unmerge() -> None:
    t = {k: v.double() for k, v in _inputs(torch.float64).items()}
    delta = delta_weight(t["a"], t["b"], SCALING)
    merged, scale = dora_merge(t["w"], delta, t["m"])
    assert_close(torch.linalg.vector_norm(merged, dim=1), t["m"], changed_from=torch.linalg.vector_norm(t["w"], dim=1))
    assert_close(dora_unmerge(merged, delta, scale), t["w"], changed_from=merged)
    x = t["x"]  # the merged layer computes the reference DoRA layer
    assert_close(F.linear(x, merged, t["bias"]), _dora_layer(t), changed_from=F.linear(x, t["w"], t["bias"]))


# -- the fast paths as the layer takes them --------------------------------------------------------
def _adapted(dtype: torch.dtype, hooked: bool, **options: object) -> AdaptedLayer:
    torch.manual_seed(0)
    base = nn.Linear(24, 20).to(dtype).requires_grad_(False)
    if hooked:  # a hook on the base: no one-node layer, the addmm accumulation instead
        base.register_forward_hook(lambda module, args, out: None)
    layer = AdaptedLayer(base)
    adapter = LoraLinear(base, 4, SCALING, init=False, **options)  # type: ignore[arg-type]
    with torch.no_grad():
        adapter.lora_B.weight.mul_(4)  # an effect on the output well above half precision's rounding
    layer.add_adapter("a", adapter)
    if "use_dora" in options:
        with torch.no_grad():
            layer.adapters["a"].lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, 20))
    layer.set_active(["a"])
    return layer


def _outputs(layer: AdaptedLayer, x: torch.Tensor, fused: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    LoraLinear.fused = fused  # the class-wide switch, as benchmarks flip it
    try:
        x = x.detach().requires_grad_(True)
        y = layer(x)
        y.float().mul(torch.linspace(-1, 1, 20)).sum().backward()
    finally:
        LoraLinear.fused = True
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    return y.detach(), {**grads, "x": x.grad}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", [{}, {"use_dora": True}], ids=["lora", "dora"])
@pytest.mark.parametrize("hooked", [False, True], ids=["one-node", "addmm"])
def test_the_layer_fast_paths_agree_with_the_reference_switch(dtype: torch.dtype, options: dict, hooked: bool) -> None:
    """``LoraLinear.fused = False`` computes the reference; the fast path taken otherwise agrees, gradients too."""
    layer = _adapted(dtype, hooked, **options)
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(2)).to(dtype)
    (y, g), (y_ref, g_ref) = _outputs(layer, x, True), _outputs(layer, x, False)
    eps = torch.finfo(dtype).eps
    scale = y_ref.abs().max().item()
    with torch.no_grad():
        base = layer.base_layer(x)
    assert_close(y, y_ref, rtol=4 * eps, atol=4 * eps * scale, changed_from=base)
    assert g.keys() == g_ref.keys()
    for name, grad in g.items():
        ref = g_ref[name]
        assert_close(grad, ref, rtol=8 * eps, atol=8 * eps * ref.abs().max().item(), msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", [{}, {"use_dora": True}], ids=["lora", "dora"])
def test_a_merged_layer_computes_what_the_fast_path_computed(dtype: torch.dtype, options: dict) -> None:
    layer = _adapted(dtype, False, **options)
    adapter = layer.adapters["a"]
    x = torch.randn(4, 24, generator=torch.Generator().manual_seed(3)).to(dtype)
    with torch.no_grad():
        before = layer.base_layer(x)
        fast = layer(x)
        adapter.merge(layer.base_layer)
        merged = layer.base_layer(x)
    eps = torch.finfo(dtype).eps  # the merged weight is rounded to the layer's dtype once
    assert_close(merged, fast, rtol=8 * eps, atol=eps * fast.abs().max().item(), changed_from=before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_adapters_on_one_layer_agree_with_the_reference_switch(dtype: torch.dtype) -> None:
    """A LoRA and a DoRA adapter active together (no one-node layer: each adds its delta) against the reference.

    DoRA's delta is of the base output, not of the sum it is added to (main had it wrong in half precision).
    """
    layer = _adapted(dtype, False)
    base = layer.base_layer
    torch.manual_seed(1)
    dora = LoraLinear(base, 2, 0.5, init=False, use_dora=True)
    with torch.no_grad():
        dora.lora_B.weight.mul_(4)
        dora.lora_magnitude_vector.mul_(torch.linspace(3.0, 0.2, 20))
    layer.add_adapter("d", dora)
    layer.set_active(["a", "d"])
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(2)).to(dtype)
    (y, g), (y_ref, g_ref) = _outputs(layer, x, True), _outputs(layer, x, False)
    eps = torch.finfo(dtype).eps
    with torch.no_grad():
        alone = _adapted(dtype, False)(x)
    assert_close(y, y_ref, rtol=4 * eps, atol=eps * y_ref.abs().max().item(), changed_from=alone)
    assert len(g) == len(g_ref) == 6  # x, A and B of both, the magnitude
    for name, grad in g.items():
        ref = g_ref[name]
        assert_close(grad, ref, rtol=8 * eps, atol=8 * eps * ref.abs().max().item(), msg=name)
