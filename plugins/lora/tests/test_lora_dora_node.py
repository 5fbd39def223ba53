"""DoRA's one-node layer (``DoraLinearFunction``): against the reference over shapes, against PEFT on a model, its host work."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator

import peft
import pytest
import torch
from dora_helpers import dora_kernels_on
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import grafting
from grafting.model.layer import AdaptedLayer
from grafting.testing import tiny_llama
from grafting_lora import dora_node
from grafting_lora.layers import LoraLinear

HALF = [torch.bfloat16, torch.float16]
SIDES = {"gradient": math.inf, "weight": 0.0, "by shape": dora_node.WEIGHT_SIDE_ABOVE}


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def _layer(n_in: int, n_out: int, r: int, dtype: torch.dtype, bias: bool, dropout: float, seed: int) -> AdaptedLayer:
    torch.manual_seed(seed)
    base = nn.Linear(n_in, n_out, bias=bias).to(dtype).requires_grad_(False)
    layer = AdaptedLayer(base)
    adapter = LoraLinear(base, r, 2.0, dropout=dropout, init=False, use_dora=True)
    with torch.no_grad():
        # ‖ΔW‖ at most a quarter of ‖W‖ row by row: the norms from ‖W‖² (dora_node.dora_norm_squared) lose to
        # cancellation where ‖W + ΔW‖ ≪ ‖W‖, as any expansion of ‖W + ΔW‖² around ‖W‖² does
        ratio = (adapter.delta_matrix().norm(dim=1) / base.weight.float().norm(dim=1)).max()
        adapter.lora_B.weight.mul_(min(1.0, 0.25 / ratio.item()))
        # a magnitude away from ‖W + ΔW‖: s ≠ 1
        adapter.lora_magnitude_vector.mul_(torch.rand(n_out, generator=torch.Generator().manual_seed(seed)) + 0.5)
    layer.add_adapter("a", adapter)
    layer.set_active(["a"])
    return layer.train()


def _step(layer: AdaptedLayer, x: torch.Tensor, fused_path: bool, seed: int = 5) -> tuple[torch.Tensor, dict]:
    layer.adapters["a"].fused = fused_path
    x = x.detach().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout mask on both paths
    y = layer(x)
    assert ("DoraLinearFunction" in type(y.grad_fn).__name__) == fused_path
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    (y * upstream).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    grads["x"] = x.grad.clone()
    layer.zero_grad(set_to_none=True)
    return y.detach(), grads


@contextlib.contextmanager
def _backward_side(side: str) -> Iterator[None]:
    """The node's backward form forced (``dora_node.WEIGHT_SIDE_ABOVE``), restored after."""
    kept = dora_node.WEIGHT_SIDE_ABOVE
    dora_node.WEIGHT_SIDE_ABOVE = SIDES[side]
    try:
        yield
    finally:
        dora_node.WEIGHT_SIDE_ABOVE = kept


@given(
    side=st.sampled_from(list(SIDES)),
    # enough elements that a norm-relative error averages roundings (on a few elements an output or input
    # gradient can cancel to far below its terms, and either path's rounding of the terms dominates)
    tokens=st.integers(4, 40),
    n_in=st.integers(6, 24),
    n_out=st.integers(6, 24),
    r=st.integers(1, 8),
    dtype=st.sampled_from(HALF),
    bias=st.booleans(),
    dropout=st.sampled_from([0.0, 0.3]),
    kernels=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_the_dora_node_agrees_with_the_reference(
    side: str,
    tokens: int,
    n_in: int,
    n_out: int,
    r: int,
    dtype: torch.dtype,
    bias: bool,
    dropout: float,
    kernels: bool,
    seed: int,
) -> None:
    """Values and gradients (input, A, B, magnitude) of the node equal the reference's, both backward forms,
    with DoRA's Triton kernels (interpreted) or their torch ops."""
    layer = _layer(n_in, n_out, r, dtype, bias, dropout, seed)
    x = torch.randn(tokens, n_in, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    y_ref, g_ref = _step(layer, x, fused_path=False)
    with _backward_side(side), dora_kernels_on(kernels):
        y, g = _step(layer, x, fused_path=True)
    # norm-relative; on a tensor of a few elements that is the largest element's error: each path rounds a
    # gradient three times in `dtype`
    tol = 2 * torch.finfo(dtype).eps
    assert y.dtype == y_ref.dtype == dtype
    assert _relative(y, y_ref) <= tol
    assert g.keys() == g_ref.keys() == {"x", *(f"adapters.a.{n}" for n, _ in layer.adapters["a"].named_parameters())}
    for name, grad in g.items():
        assert grad.dtype == g_ref[name].dtype, name
        if g_ref[name].norm() > 0:
            assert _relative(grad, g_ref[name]) <= 2 * tol, name
        else:  # e.g. no input gradient through an all-dropped A: both exactly zero
            assert grad.norm() == 0, name


class _Ops(TorchDispatchMode):
    """The aten ops run, with the sizes of their outputs (views and allocations left out: no kernel)."""

    FREE = frozenset({"view", "_unsafe_view", "t", "transpose", "unsqueeze", "expand", "detach"})
    FREE |= {"empty", "empty_like", "new_empty"}

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in self.FREE:
            first = out[0] if isinstance(out, tuple | list) else out
            self.sizes.append((name, first.numel() if isinstance(first, torch.Tensor) else 0))
        return out


def _traced_step(layer: AdaptedLayer, tokens: int, n_in: int) -> tuple[_Ops, _Ops]:
    x = torch.randn(tokens, n_in).to(torch.bfloat16).requires_grad_(True)
    layer(x).sum().backward()  # ‖W‖² is kept from here on
    layer.zero_grad(set_to_none=True)
    x.grad = None  # the step's gradients are new tensors, not accumulated
    with _Ops() as forward:
        y = layer(x)
    grad = torch.ones_like(y)
    with _Ops() as backward:
        y.backward(grad)
    return forward, backward


@pytest.mark.parametrize(("dropout", "budget"), [(0.0, 28), (0.1, 35)])
def test_a_dora_layer_launches_few_ops_and_no_weight_sized_pass(dropout: float, budget: int) -> None:
    """Forward and backward of one DoRA layer (bf16, r 4): at most ``budget`` kernel-launching ops (LoRA's
    is 14; the scale is cast to the compute dtype before each activation-sized product, since a product
    of two dtypes takes the GPU's slow converting kernel), none with an (out, in)-sized result when the
    activations are the smaller side."""
    n_in, n_out, tokens = 48, 40, 6
    layer = _layer(n_in, n_out, 4, torch.bfloat16, False, dropout, 0)
    forward, backward = _traced_step(layer, tokens, n_in)
    assert len(forward.sizes) + len(backward.sizes) <= budget, (forward.sizes, backward.sizes)
    largest = max(size for _, size in forward.sizes + backward.sizes)
    assert largest < n_out * n_in, (forward.sizes, backward.sizes)


def test_the_backward_puts_the_scale_on_the_weight_when_activations_are_larger() -> None:
    """Many tokens, a narrow layer: the (out, in) rows carry ``s`` in backward instead of the (tokens, out) gradient."""
    n_in, n_out = 8, 12
    tokens = int(dora_node.WEIGHT_SIDE_ABOVE * n_in) + 1
    layer = _layer(n_in, n_out, 2, torch.bfloat16, False, 0.0, 0)
    _, backward = _traced_step(layer, tokens, n_in)
    products = [size for name, size in backward.sizes if name == "mul"]
    assert n_out * n_in in products
    assert products.count(tokens * n_out) == 1  # g ⊙ z, for the magnitude's gradient; no g ⊙ s


# -- against PEFT's DoRA on a model --------------------------------------------------------------------------------
def _key(name: str) -> str:
    """A trainable parameter's name in either library, as ``<module>.<lora_A|lora_B|lora_magnitude_vector>``."""
    if ".adapters.default." in name:  # grafting: <module>.adapters.default.lora_A.weight
        module, rest = name.split(".adapters.default.")
        return f"{module}.{rest.split('.')[0]}"
    for kind in ("lora_A", "lora_B", "lora_magnitude_vector"):  # PEFT: <module>.lora_A.default.weight
        if f".{kind}.default." in name:
            return f"{name.split(f'.{kind}.default.')[0]}.{kind}"
    raise AssertionError(name)


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[k].double().flatten() for k in sorted(grads)])


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_dora_training_step_is_as_close_to_peft_as_the_reference(dropout: float) -> None:
    """bf16 Llama, DoRA on every linear layer: the one-node layer's logits, loss and adapter gradients are as
    close to PEFT's DoRA computed in float64 as the reference path's (bf16 through a model is far from exact)."""
    base = tiny_llama(hidden=32).to(torch.bfloat16)
    options = {"r": 4, "lora_alpha": 16, "target_modules": "all-linear", "init_lora_weights": False, "use_dora": True}
    options["lora_dropout"] = dropout
    ours = grafting.get_peft_model(copy.deepcopy(base), grafting.LoraConfig(**options))
    exact = peft.get_peft_model(copy.deepcopy(base).double(), peft.LoraConfig(**options)).double()
    mine = {_key(n): p for n, p in ours.named_parameters() if p.requires_grad}
    other = {_key(n): p for n, p in exact.named_parameters() if p.requires_grad}
    assert mine.keys() == other.keys()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, p in mine.items():
            if key.endswith("lora_magnitude_vector"):  # away from ‖W + ΔW‖: s ≠ 1
                p.mul_(torch.rand(p.shape, generator=generator) + 0.5)
            other[key].copy_(p)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    runs = {}
    for name, model, params, fused_path in (
        ("node", ours, mine, True),
        ("reference", ours, mine, False),
        ("peft", exact, other, None),
    ):
        for module in model.modules():
            if isinstance(module, LoraLinear):
                module.fused = bool(fused_path)
        model.train()
        torch.manual_seed(7)  # the same dropout masks, layer by layer (PEFT draws them on float64 inputs: the same)
        nodes: list[str] = []
        hook = model.base_model.model.model.layers[0].self_attn.q_proj.register_forward_hook(
            lambda module, args, y, seen=nodes: seen.append(type(y.grad_fn).__name__)
        )
        out = model(input_ids=ids, labels=ids)
        hook.remove()
        assert ("DoraLinearFunction" in nodes[0]) == bool(fused_path), nodes
        out.loss.backward()
        runs[name] = (
            out.logits.detach().double(),
            out.loss.detach().double(),
            _flat({k: p.grad for k, p in params.items()}),
        )
        model.zero_grad(set_to_none=True)
    with torch.no_grad():
        plain = base(input_ids=ids).logits.double()
    assert _relative(plain, runs["peft"][0]) > 0.5  # the adapters move the output
    eps = torch.finfo(torch.bfloat16).eps
    for what, index in (("logits", 0), ("loss", 1), ("gradients", 2)):
        node = _relative(runs["node"][index], runs["peft"][index])
        reference = _relative(runs["reference"][index], runs["peft"][index])
        print(f"DoRA vs PEFT float64, dropout {dropout}, {what}: node {node:.4f}, reference {reference:.4f}")
        assert node <= 1.5 * reference + eps, (what, node, reference)
