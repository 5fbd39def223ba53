"""Routed LoRA adapters side by side (grafting_lora.routed) against each adapter on its own rows: values and gradients.

The fast path computes every routed adapter's ranks over the whole batch and masks each sample to
its own adapter's columns (one autograd node). Checked directly in float64, float32, bfloat16 and
float16 against the reference (``reference.lora_delta`` of each adapter on the rows routed to it,
in float64 on the same rounded inputs), over random ranks, scalings and routes (samples on no
adapter, adapters with no sample, every sample on one adapter); then as the layer takes it, against
the one-adapter-at-a-time path (``fused = False``), in training, inference, after weight updates and
across batches, and with another method routed on the same layers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import grafting
import grafting_lora.layers
from grafting.model.layer import AdaptedLayer
from grafting.testing import assert_close, tiny_llama
from grafting_lora.layers import LoraLinear
from grafting_lora.reference import lora_delta
from grafting_lora.routed import RoutedLoraFunction, column_mask, routed_lora_add, routed_lora_linear_call

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
HALF = [torch.bfloat16, torch.float16]
N_IN, N_OUT, LENGTH = 12, 10, 3


@st.composite
def routes(draw: st.DrawFn, equal_ranks: bool = False) -> tuple[list[int], list[float], list[int]]:
    """(ranks, scalings, index): 1-4 adapters of ranks 1-6 (with ``equal_ranks``, 2-4 of one rank: the batched
    gradient of ``B``), 1-6 samples each on one of them or on none (-1)."""
    n = draw(st.integers(2 if equal_ranks else 1, 4))
    one_rank = st.integers(1, 6).map(lambda r: [r] * n)
    ranks = draw(one_rank if equal_ranks else st.lists(st.integers(1, 6), min_size=n, max_size=n))
    scalings = draw(st.lists(st.sampled_from([0.5, 1.0, 2.0, 4.0 / 3.0]), min_size=n, max_size=n))
    index = draw(st.lists(st.integers(-1, n - 1), min_size=1, max_size=6))
    return ranks, scalings, index


def _tensors(ranks: list[int], batch: int, dtype: torch.dtype, seed: int, node: str) -> dict[str, torch.Tensor]:
    """Input in ``dtype``, and the base output ``y`` (node "add") or the base layer's weight and bias ("linear"),
    the base small beside the deltas; each adapter's factors in float32 (float64 for float64)."""
    g = torch.Generator().manual_seed(seed)
    factor_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out = {"x": torch.randn(batch, LENGTH, N_IN, generator=g).to(dtype)}
    if node == "add":
        out["y"] = (torch.randn(batch, LENGTH, N_OUT, generator=g) / 4).to(dtype)
    else:
        out["w"] = (torch.randn(N_OUT, N_IN, generator=g) / (4 * N_IN**0.5)).to(dtype)
        out["bias"] = (torch.randn(N_OUT, generator=g) / 4).to(dtype)
    for k, r in enumerate(ranks):
        out[f"a{k}"] = (torch.randn(r, N_IN, generator=g) / 3).to(factor_dtype)
        out[f"b{k}"] = (torch.randn(N_OUT, r, generator=g) * 2).to(factor_dtype)
    return out


def _base(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return t["y"] if "y" in t else F.linear(t["x"], t["w"], t["bias"])


def _reference(t: dict[str, torch.Tensor], scalings: list[float], index: list[int]) -> torch.Tensor:
    """The base output with each routed sample's rows plus ``lora_delta`` of its own adapter alone."""
    out = _base(t)
    for k, scaling in enumerate(scalings):
        rows = torch.tensor([i for i, j in enumerate(index) if j == k], dtype=torch.long)
        if len(rows):
            own = out[rows] + lora_delta(t["x"][rows], t[f"a{k}"], t[f"b{k}"], scaling)
            out = out.index_copy(0, rows, own)
    return out


def _fast(t: dict[str, torch.Tensor], scalings: list[float], index: list[int]) -> torch.Tensor:
    """:func:`routed_lora_add` on the base output, or :func:`routed_lora_linear_call` with the base layer inside."""
    n = len(scalings)
    lora_a, lora_b = [t[f"a{k}"] for k in range(n)], [t[f"b{k}"] for k in range(n)]
    mask = column_mask(torch.tensor(index), [a.shape[0] for a in lora_a], scalings, t["x"].dtype)
    if "y" in t:
        return routed_lora_add(t["y"], t["x"], mask, lora_a, lora_b)
    return routed_lora_linear_call(t["x"], t["w"], t["bias"], mask, lora_a, lora_b)


def _run(fn, t, scalings, index, grad: bool):  # type: ignore[no-untyped-def]
    leaves = {k: v.detach().requires_grad_(grad) for k, v in t.items()}
    if not grad:
        with torch.no_grad():
            return fn(leaves, scalings, index), {}
    out = fn(leaves, scalings, index)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    (out * upstream).sum().backward()
    return out.detach(), {k: v.grad for k, v in leaves.items()}


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, msg: str, **moved: torch.Tensor) -> None:
    """Within a few roundings of ``dtype`` (the dtype the products ran in): 8 relative to the entry, 4 to the largest."""
    eps = torch.finfo(dtype).eps
    expected = expected.to(actual.dtype)
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert_close(actual, expected, rtol=8 * eps, atol=4 * eps * scale, msg=msg, **moved)


@settings(max_examples=10, deadline=None)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("node", ["add", "linear"])
@given(route=routes(), seed=st.integers(0, 2**16))
def test_routed_factors_side_by_side_are_each_adapter_on_its_own_rows(
    dtype: torch.dtype, grad: bool, node: str, route: tuple[list[int], list[float], list[int]], seed: int
) -> None:
    """Both nodes (on the base output; with the base layer inside, its weight and bias trained too)."""
    _check_side_by_side(dtype, grad, node, route, seed)


@settings(max_examples=8, deadline=None)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("node", ["add", "linear"])
@given(route=routes(equal_ranks=True), seed=st.integers(0, 2**16))
def test_adapters_of_one_rank_side_by_side_are_each_adapter_on_its_own_rows(
    dtype: torch.dtype, node: str, route: tuple[list[int], list[float], list[int]], seed: int
) -> None:
    """As above, the adapters of one rank (their ``B`` gradients from one batched product, one cast)."""
    _check_side_by_side(dtype, True, node, route, seed)


def _check_side_by_side(
    dtype: torch.dtype, grad: bool, node: str, route: tuple[list[int], list[float], list[int]], seed: int
) -> None:
    ranks, scalings, index = route
    t = _tensors(ranks, len(index), dtype, seed, node)
    out, grads = _run(_fast, t, scalings, index, grad)
    wide = {k: v.double() for k, v in t.items()}
    expected, expected_grads = _run(_reference, wide, scalings, index, grad)
    assert out.dtype == dtype
    routed = [i for i, j in enumerate(index) if j >= 0]
    with torch.no_grad():
        base_out = _base(t)
    _close(out, expected, dtype, "output", **({"changed_from": base_out} if routed else {}))
    base = [i for i, j in enumerate(index) if j < 0]
    _close(out[base], base_out[base], dtype, "samples on no adapter keep the base output")
    for name, grad_value in grads.items():
        assert grad_value is not None, name
        assert grad_value.dtype == t[name].dtype, name
        if expected_grads[name] is None:  # an adapter no sample is routed to (or x, none routed): exactly zero
            assert_close(grad_value, torch.zeros_like(grad_value), rtol=0, atol=0, msg=name)
        else:
            _close(grad_value, expected_grads[name], dtype, name)


@pytest.mark.parametrize("dtype", HALF)
def test_every_sample_on_one_adapter_is_that_adapter_alone(dtype: torch.dtype) -> None:
    """All samples routed to the second of three adapters: its single-adapter delta; the others get zero gradients."""
    ranks, scalings, index = [2, 5, 3], [1.0, 2.0, 0.5], [1, 1, 1, 1]
    t = _tensors(ranks, len(index), dtype, 5, "add")
    out, grads = _run(_fast, t, scalings, index, True)

    def alone(t: dict[str, torch.Tensor], scalings: list[float], index: list[int]) -> torch.Tensor:
        return t["y"] + lora_delta(t["x"], t["a1"], t["b1"], scalings[1]) + 0 * (t["a0"].sum() + t["b0"].sum())

    expected, expected_grads = _run(alone, {k: v.double() for k, v in t.items()}, scalings, index, True)
    _close(out, expected, dtype, "output", changed_from=t["y"])
    for name in ("x", "y", "a1", "b1"):
        _close(grads[name], expected_grads[name], dtype, name)
    for name in ("a0", "b0", "a2", "b2"):
        assert_close(grads[name], torch.zeros_like(grads[name]), rtol=0, atol=0, msg=name)


def _layer(dtype: torch.dtype, ranks: list[int], scalings: list[float], fused: bool, seed: int = 0) -> AdaptedLayer:
    torch.manual_seed(seed)
    base = nn.Linear(N_IN, N_OUT).to(dtype).requires_grad_(False)
    layer = AdaptedLayer(base)
    for k, (r, s) in enumerate(zip(ranks, scalings, strict=True)):
        adapter = LoraLinear(base, r, s, init=False)
        adapter.fused = fused
        layer.add_adapter(f"a{k}", adapter)
    layer.set_active([f"a{k}" for k in range(len(ranks))])
    return layer


def _layer_run(
    layer: AdaptedLayer, x: torch.Tensor, names: list[str]
) -> tuple[torch.Tensor, dict[str, torch.Tensor], bool]:
    """Output, gradients (x's too) of a routed call, and whether it was the routed LoRA node."""
    x = x.detach().requires_grad_(True)
    with grafting.route_samples(names):
        y = layer(x)
    routed_node = type(y.grad_fn).__name__ == "RoutedLoraLinearFunctionBackward"
    assert not routed_node or all(a.fused for a in layer.adapters.values())
    (y.float() * torch.linspace(-1, 1, N_OUT)).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    return y.detach(), {**grads, "x": x.grad}, routed_node


@settings(max_examples=8, deadline=None)
@pytest.mark.parametrize("dtype", HALF)
@given(route=routes(), seed=st.integers(0, 2**16))
def test_the_layer_routes_lora_adapters_as_one_at_a_time(
    dtype: torch.dtype, route: tuple[list[int], list[float], list[int]], seed: int
) -> None:
    """The layer's routed fast path against ``fused = False`` (each adapter on its rows): outputs and gradients."""
    ranks, scalings, index = route
    names = [f"a{j}" if j >= 0 else "__base__" for j in index]
    x = torch.randn(len(index), LENGTH, N_IN, generator=torch.Generator().manual_seed(seed)).to(dtype)
    (fast, fast_grads, fast_node), (plain, plain_grads, _) = (
        _layer_run(_layer(dtype, ranks, scalings, fused), x, names) for fused in (True, False)
    )
    _close(fast, plain, dtype, "output")
    assert fast_node == any(j >= 0 for j in index)  # the base and the adapters in one node wherever one is routed
    assert fast_grads.keys() >= plain_grads.keys()
    for name, value in fast_grads.items():
        if name in plain_grads:
            _close(value, plain_grads[name], dtype, name)
        else:  # an adapter no sample reaches: its gradient is exactly zero
            assert_close(value, torch.zeros_like(value), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("dtype", HALF)
def test_inference_follows_weight_updates_and_new_routes(dtype: torch.dtype) -> None:
    """Without autograd the factors side by side are kept between calls: a weight changed in place, or another
    route for the next batch, gives that weight's and that route's output."""
    ranks, scalings = [2, 4, 3], [1.0, 0.5, 2.0]
    fast, plain = (_layer(dtype, ranks, scalings, fused) for fused in (True, False))
    x = torch.randn(4, LENGTH, N_IN, generator=torch.Generator().manual_seed(3)).to(dtype)
    routes = [["a0", "a1", "a2", "__base__"], ["a2", "a2", "a0", "a1"], ["a0", "a1", "a2", "__base__"]]
    for step, names in enumerate(routes):
        if step == 2:
            for layer in (fast, plain):
                with torch.no_grad():
                    layer.adapters["a1"].lora_B.weight.mul_(-3.0)
        with torch.no_grad(), grafting.route_samples(names):
            got, expected = fast(x), plain(x)
            base = fast.base_layer(x)
        _close(got, expected, dtype, f"batch {step}", changed_from=base)


def test_many_adapters_take_the_gathered_product(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ``MAX_COLUMNS`` ranks side by side the layer gathers each sample's factors instead: the same values."""
    monkeypatch.setattr(grafting_lora.layers, "MAX_COLUMNS", 4)
    ranks, scalings, dtype = [2, 4, 3], [1.0, 0.5, 2.0], torch.bfloat16
    names = ["a2", "__base__", "a0", "a1", "a2"]
    x = torch.randn(len(names), LENGTH, N_IN, generator=torch.Generator().manual_seed(4)).to(dtype)
    (fast, fast_grads, fast_node), (plain, plain_grads, _) = (
        _layer_run(_layer(dtype, ranks, scalings, fused), x, names) for fused in (True, False)
    )
    _close(fast, plain, dtype, "output")
    assert not fast_node
    assert fast_grads.keys() == plain_grads.keys()
    for name, value in fast_grads.items():
        _close(value, plain_grads[name], dtype, name)


def test_routed_training_with_another_method_on_the_same_layers_is_one_adapter_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bfloat16 model, two LoRA adapters and a LoHa one on the attention layers, routed per sample with base
    samples: the gradients of the LoRA fast path equal those of each LoRA adapter applied on its own rows."""
    names = ["lora1", "loha", "__base__", "lora0", "lora1", "lora0"]
    ids = torch.randint(0, 64, (len(names), 6), generator=torch.Generator().manual_seed(7))
    results = []
    calls = {True: 0, False: 0}
    apply = RoutedLoraFunction.apply
    for fused in (True, False):
        monkeypatch.setattr(LoraLinear, "fused", fused)

        def counted(*args: torch.Tensor, fused: bool = fused) -> torch.Tensor:
            calls[fused] += 1
            return apply(*args)

        monkeypatch.setattr(RoutedLoraFunction, "apply", counted)
        model = tiny_llama(seed=1).to(torch.bfloat16)
        attention = ["q_proj", "v_proj"]
        lora = [
            grafting.LoraConfig(r=r, lora_alpha=2 * r, target_modules=attention, init_lora_weights=False)
            for r in (2, 5)
        ]
        model = grafting.get_peft_model(model, lora[0], adapter_name="lora0", mixed=True)
        model.add_adapter("lora1", lora[1])
        model.add_adapter("loha", grafting.LoHaConfig(r=2, alpha=4, target_modules=attention, init_weights=False))
        model.to(torch.bfloat16)
        model.set_adapter(["lora0", "lora1", "loha"])
        logits = model(input_ids=ids, adapter_names=names).logits.float()
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logits.detach(), grads))
    (fast, fast_grads), (plain, plain_grads) = results
    _close(fast, plain, torch.bfloat16, "logits")
    assert fast_grads.keys() == plain_grads.keys()
    assert any("loha" in n for n in fast_grads)
    assert any("lora1" in n for n in fast_grads)
    assert calls[True] > 0  # the LoRA adapters took the routed node in every adapted layer
    assert calls[False] == 0
    for name, value in fast_grads.items():
        expected = plain_grads[name]
        relative = ((value - expected).norm() / expected.norm()).item()
        assert relative <= 4 * torch.finfo(torch.bfloat16).eps, (name, relative)


ROUTE = ["a0", "a1", "__base__"]


def _kept_pair(seed: int) -> tuple[AdaptedLayer, AdaptedLayer, torch.Tensor]:
    """A routed layer (its factors kept side by side by a first no-grad call), the same one at a time, an input."""
    fast, plain = (_layer(torch.bfloat16, [2, 4], [1.0, 0.5], fused) for fused in (True, False))
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(3, LENGTH, N_IN, generator=torch.Generator().manual_seed(seed)).bfloat16()
    with torch.no_grad(), grafting.route_samples(ROUTE):
        fast(x)
    return fast, plain, x


def _same_routed_output(fast: AdaptedLayer, plain: AdaptedLayer, x: torch.Tensor, msg: str) -> None:
    with torch.no_grad(), grafting.route_samples(ROUTE):
        got, expected, base = fast(x), plain(x), fast.base_layer(x)
    _close(got, expected, torch.bfloat16, msg, changed_from=base)


def test_routed_inference_follows_a_fused_optimizer_step() -> None:
    """Fused AdamW writes the factors without bumping their version counters: the kept factors follow it anyway."""
    fast, plain, x = _kept_pair(4)
    for layer in (fast, plain):
        adapters = [p for p in layer.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(adapters, lr=0.5, fused=True)
        for p in adapters:
            p.grad = torch.ones_like(p)
        versions = [p._version for p in adapters]
        optimizer.step()
    assert [p._version for p in adapters] == versions  # the case at hand: no version moved
    _same_routed_output(fast, plain, x, "after the step")


def test_routed_inference_follows_a_weight_put_in_place_of_another() -> None:
    """A new ``Parameter`` assigned in a factor's place, its version counter at the old one's, is the one used."""
    fast, plain, x = _kept_pair(5)
    new_b = torch.randn(N_OUT, 4, generator=torch.Generator().manual_seed(6))
    for layer in (fast, plain):
        old = layer.adapters["a1"].lora_B.weight
        weight = nn.Parameter(new_b.clone())
        with torch.no_grad():
            while weight._version < old._version:  # each in-place write bumps the counter by one
                weight.mul_(1.0)
        layer.adapters["a1"].lora_B.weight = weight
        assert weight._version == old._version  # the case at hand: the counter alone cannot tell them apart
    _same_routed_output(fast, plain, x, "after the new weight")
