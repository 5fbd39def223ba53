"""Shared-input grouping in the core: sibling layers' input-side products as one matmul, the same results.

A toy low-rank method (``delta = (x·Aᵀ)·Bᵀ``, its ``A`` declared by ``input_factor``) on a custom
model whose q/k/v and gate/up read one tensor each, and whose ``side`` layer reads another.
"""

from __future__ import annotations

import copy
import pickle
from typing import Any, ClassVar

import attrs
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import grafting
from grafting import AdapterConfig, DeltaAdapter, Method, hookimpl
from grafting.model.grouping import CAPACITY
from grafting.model.layer import AdaptedLayer
from grafting.model.routing import BASE
from grafting.model.weights import add_to_weight, in_out_features
from grafting.testing import assert_close, tiny_llama
from tests.toy_methods import ToyOutputConfig, ToyPlugin

NAMES = ("q", "k", "v", "o", "gate", "up", "down", "side")
MM = ("aten.mm.default", "aten.addmm.default", "aten.addmm_.default", "aten.bmm.default")


@attrs.define(kw_only=True)
class ToyLowRankConfig(AdapterConfig):
    peft_type: ClassVar[str] = "TOY_LOW_RANK"
    dropout: float = 0.0
    groupable: bool = True


class ToyLowRank(DeltaAdapter):
    """``delta = (dropout(x)·Aᵀ)·Bᵀ``; declares ``A`` as its input factor where no dropout is drawn."""

    def __init__(self, base_layer: nn.Module, rank: int, dropout: float, groupable: bool, seed: int) -> None:
        super().__init__()
        n_in, n_out = in_out_features(base_layer)
        gen = torch.Generator().manual_seed(seed)
        self.toy_a = nn.Parameter(0.4 * torch.randn(rank, n_in, generator=gen))
        self.toy_b = nn.Parameter(0.4 * torch.randn(n_out, rank, generator=gen))
        self.drop: nn.Module = nn.Dropout(dropout) if dropout else nn.Identity()
        self.groupable = groupable

    def input_factor(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.groupable or (isinstance(self.drop, nn.Dropout) and self.drop.training):
            return None
        return self.toy_a

    def forward(self, x: torch.Tensor, call: grafting.LayerCall) -> torch.Tensor:
        return F.linear(F.linear(self.drop(x), self.toy_a), self.toy_b)

    def add_delta(
        self, y: torch.Tensor, x: torch.Tensor, call: grafting.LayerCall, product: torch.Tensor | None = None
    ) -> torch.Tensor:
        if product is None:
            return y + self(x, call)
        return y + F.linear(product, self.toy_b)

    def merge(self, base_layer: nn.Module) -> None:
        add_to_weight(base_layer, (self.toy_b @ self.toy_a).detach())

    def unmerge(self, base_layer: nn.Module) -> None:
        add_to_weight(base_layer, (self.toy_b @ self.toy_a).detach(), alpha=-1.0)


class ToyLowRankPlugin:
    @hookimpl
    def grafting_methods(self) -> list[Method]:
        return [Method(peft_type="TOY_LOW_RANK", name="toy_low_rank", config_class=ToyLowRankConfig)]

    @hookimpl
    def grafting_create_layer_adapter(
        self, config: Any, base_layer: nn.Module, adapter_name: str, module_name: str
    ) -> nn.Module | None:
        if not isinstance(base_layer, nn.Linear):
            return None
        seed = sum(map(ord, adapter_name + module_name))
        return ToyLowRank(base_layer, 1 + seed % 4, config.dropout, config.groupable, seed)  # ranks differ


@pytest.fixture(scope="module")
def low_rank() -> Any:
    plugin = ToyLowRankPlugin()
    grafting.register_plugin(plugin, name="toy-low-rank")
    yield plugin
    grafting.unregister_plugin(plugin)


class Block(nn.Module):
    def __init__(self, d: int = 12) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.gate, self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.side = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        h = x + self.o(q * torch.sigmoid(k) + v)
        return h + self.down(F.silu(self.gate(h)) * self.up(h)) + self.side(0.5 * h)


class Net(nn.Module):
    def __init__(self, blocks: int = 2, checkpointed: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Block() for _ in range(blocks))
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x)
        return x


class Count(TorchDispatchMode):
    """Counts the matrix products dispatched."""

    def __init__(self) -> None:
        super().__init__()
        self.products = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if str(func) in MM:
            self.products += 1
        return func(*args, **(kwargs or {}))


def _model(targets: list[str], dtype: torch.dtype, **options: Any) -> nn.Module:
    model = grafting.get_peft_model(
        Net(), ToyLowRankConfig(target_modules=targets, **options), adapter_name="a", mixed=True
    )
    return model.to(dtype)


def _layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def _step(model: nn.Module, x: torch.Tensor, grouping: bool, **call: Any) -> tuple[torch.Tensor, dict, int]:
    """Output, every gradient (input and adapters) and the number of matrix products of one forward+backward."""
    x = x.detach().requires_grad_(True)
    counter = Count()
    with grafting.shared_input_grouping(grouping), counter:
        torch.manual_seed(5)  # dropout draws the same masks with and without grouping
        if "adapter_names" in call:
            with grafting.route_samples(call["adapter_names"]):
                y = model(x)
        else:
            y = model(x)
        weights = torch.linspace(-1, 1, y.numel()).view(y.shape).to(y.dtype)
        (y * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["x"] = x.grad.clone()
    model.zero_grad(set_to_none=True)
    return y.detach(), grads, counter.products


def _error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    return ((actual.double() - exact).norm() / exact.norm().clamp_min(1e-30)).item()


def _compare(model: nn.Module, x: torch.Tensor, dtype: torch.dtype, **call: Any) -> tuple[int, int]:
    """Grouped against ungrouped; in bfloat16 both against the float64 model: grouping adds no error of its own.

    (In bfloat16 a gradient deep in the model moves by several percent when any sum upstream is
    accumulated in another order, so the two bfloat16 results are each compared with the exact one.)
    """
    _step(model, x, True, **call)  # the first call learns the groups
    y, grads, grouped = _step(model, x, True, **call)
    y_ref, grads_ref, plain = _step(model, x, False, **call)
    assert grads.keys() == grads_ref.keys()
    if dtype != torch.bfloat16:
        assert_close(y, y_ref, msg="output")
        for name, grad in grads.items():
            assert_close(grad, grads_ref[name], msg=name)
        return grouped, plain
    y_64, grads_64, _ = _step(copy.deepcopy(model).double(), x.double(), False, **call)
    eps = torch.finfo(dtype).eps
    for name, value, ref in [("output", y, y_ref), *((n, g, grads_ref[n]) for n, g in grads.items())]:
        exact = y_64 if name == "output" else grads_64[name]
        assert _error(value, exact) <= 2 * _error(ref, exact) + eps, name
    return grouped, plain


STATES = ("plain", "second adapter", "merged", "disabled", "inactive", "routed", "mixed", "not groupable")


@settings(max_examples=8, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    targets=st.lists(st.sampled_from(NAMES), min_size=1, max_size=len(NAMES), unique=True),
    dropout=st.booleans(),
    state=st.sampled_from(STATES),
    seed=st.integers(0, 2**16),
)
def test_grouped_equals_ungrouped(
    low_rank: Any, toy_methods: ToyPlugin, dtype: torch.dtype, targets: list[str], dropout: bool, state: str, seed: int
) -> None:
    """Values and every gradient, whatever the adapters' ranks, dropout, states and routing."""
    model = _model(targets, dtype, dropout=0.3 if dropout else 0.0)
    model.train()
    x = torch.randn(4, 5, 12, generator=torch.Generator().manual_seed(seed)).to(dtype)
    call: dict[str, Any] = {}
    layers = _layers(model)
    if state in ("second adapter", "merged", "routed", "not groupable"):
        model.add_adapter("b", ToyLowRankConfig(target_modules=targets, groupable=state != "not groupable"))
        model.to(dtype)
        for layer in layers.values():
            layer.set_active(["a", "b"])
        if state == "merged":
            for layer in layers.values():
                layer.merge(["b"])
        if state == "routed":
            call["adapter_names"] = ["a", BASE, "b", "a"]
    first = layers[sorted(layers)[0]]
    if state == "disabled":
        first.disabled = True
    if state == "inactive":
        first.set_active([])
    if state == "mixed":
        model.add_adapter("out", ToyOutputConfig(target_modules=targets))
        model.to(dtype)
        for layer in layers.values():
            layer.set_active(["a", "out"])
    _compare(model, x, dtype, **call)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_siblings_share_one_product_forward_and_backward(low_rank: Any, dtype: torch.dtype) -> None:
    """q/k/v: one product instead of three, in forward, for the input's gradient and for the factors' gradients;
    gate/up: one instead of two. The layer reading another tensor (side) is not grouped."""
    model = _model(list(NAMES), dtype)
    x = torch.randn(2, 3, 12).to(dtype)
    grouped, plain = _compare(model, x, dtype)
    saved_per_block = (3 - 1) + (2 - 1)  # q/k/v and gate/up: one input-side product each
    assert plain - grouped == 3 * saved_per_block * len(model.base_model.model.blocks)
    with torch.no_grad():
        counts = []
        for on in (True, False):
            with grafting.shared_input_grouping(on), Count() as counter:
                model(x)
            counts.append(counter.products)
    assert counts[1] - counts[0] == saved_per_block * 2


def test_groups_are_learned_and_forgotten(low_rank: Any) -> None:
    """A follower that no longer reads its leader's input is dropped after one call and the results stay exact."""
    model = _model(["q", "k", "v"], torch.float64)
    block = model.base_model.model.blocks[0]
    q, k, v = block.q, block.k, block.v
    x = torch.randn(2, 12, dtype=torch.float64)
    with torch.no_grad():
        block(x)
    assert [f() for f in q.group_state.followers] == [k, v]
    y = x.clone().requires_grad_(True)
    q(y)  # the leader computes k's and v's products ...
    k(y * 2)  # ... but k reads another tensor: it computes its own
    v(y)
    q(y)  # the leader's next call drops k, whose product was not collected
    assert [f() for f in q.group_state.followers] == [v]
    others = [AdaptedLayer(nn.Linear(12, 12).double()) for _ in range(CAPACITY)]
    for other in others:
        other.add_adapter("a", ToyLowRank(other.base_layer, 2, 0.0, True, 0).double())
        other.set_active(["a"])
    q(y)  # the leader's next call drops v, which did not collect its product
    v(y)  # v is learned again
    q(y)
    inputs = [torch.randn(2, 12, dtype=torch.float64) for _ in others]  # alive: each a remembered input
    for other, z in zip(others, inputs, strict=True):  # that many layers called between q and its follower
        other(z)
    v(y)  # too late: q's input was forgotten, and v with it
    assert [f() for f in q.group_state.followers] == []
    copied = copy.deepcopy(model)
    assert copied.base_model.model.blocks[0].q.group_state.followers == []
    pickle.loads(pickle.dumps(model))  # a model with learned groups pickles (they are forgotten)


def test_products_stay_with_their_grad_mode_and_their_layer(low_rank: Any) -> None:
    """A product the leader made without autograd is not collected under autograd (the follower's factor
    would get no gradient); a shallow copy of a layer (a DataParallel replica) learns for itself."""
    model = _model(["q", "k", "v"], torch.float64)
    block = model.base_model.model.blocks[0]
    x = torch.randn(2, 12, dtype=torch.float64)
    block(x)
    with torch.no_grad():
        block.q(x)
    block.k(x).sum().backward()
    grad = block.k.adapters["a"].toy_a.grad
    assert grad is not None
    assert grad.abs().sum() > 0
    replica = block.q._replicate_for_data_parallel()
    replica(x)
    assert replica.group_state is not block.q.group_state
    assert [f() for f in block.q.group_state.followers] == [block.k, block.v]


def test_activation_checkpointing_recomputes_the_same_operations(low_rank: Any) -> None:
    """Non-reentrant checkpointing compares what the recomputation saves with the forward: grouping stays off there."""
    model = grafting.get_peft_model(Net(checkpointed=True), ToyLowRankConfig(target_modules=list(NAMES)))
    x = torch.randn(2, 3, 12)
    for _ in range(2):
        out, grads, _ = _step(model, x, True)
    model.base_model.model.checkpointed = False
    out_ref, grads_ref, _ = _step(model, x, False)
    assert_close(out, out_ref)
    for name, grad in grads.items():
        assert_close(grad, grads_ref[name], msg=name)


def test_inference_tensors_are_not_grouped(low_rank: Any) -> None:
    """Inference tensors (no version counter to tell an in-place change) take the per-layer path."""
    model = _model(["q", "k", "v"], torch.float32)
    with torch.inference_mode():
        x = torch.randn(2, 12)
        plain = model(x)
        again = model(x)
    assert_close(again, plain)
    assert all(block.q.group_state.followers == [] for block in model.base_model.model.blocks)
    counts = []
    for _ in range(2):  # outside inference mode the same calls learn, then group
        with torch.no_grad(), Count() as counter:
            model(x.clone())
        counts.append(counter.products)
    assert counts[1] < counts[0]


def test_lora_beside_ia3_takes_its_product_in_the_composition() -> None:
    """A mixed model, LoRA on q/k/v and IA3 on k and v: k and v compose (no one-node layer) and their LoRA
    adds the grouped product; grouped and ungrouped bfloat16 runs are as close to the float64 run."""
    base = tiny_llama(hidden=32).to(torch.bfloat16)
    torch.manual_seed(1)
    targets = ["q_proj", "k_proj", "v_proj"]
    model = grafting.get_peft_model(
        base, grafting.LoraConfig(r=3, target_modules=targets, init_lora_weights=False), "lora", mixed=True
    )
    model.add_adapter("ia3", grafting.IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=[]))
    model.base_model.set_adapter(["lora", "ia3"])
    for name, param in model.named_parameters():
        if "ia3_l" in name:
            torch.nn.init.normal_(param, 1.0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))

    def run(net: nn.Module, grouping: bool) -> tuple[torch.Tensor, dict, int]:
        with grafting.shared_input_grouping(grouping), Count() as counter:
            logits = net(input_ids=ids).logits
            (logits * torch.linspace(-1, 1, logits.shape[-1]).to(logits.dtype)).sum().backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        net.zero_grad(set_to_none=True)
        return logits.detach(), grads, counter.products

    run(model, True)
    y, grads, grouped = run(model, True)
    y_ref, grads_ref, plain = run(model, False)
    y_64, grads_64, _ = run(copy.deepcopy(model).double(), False)
    assert grouped < plain
    assert grads.keys() == grads_ref.keys() == grads_64.keys()
    assert any("ia3_l" in n for n in grads)
    eps = torch.finfo(torch.bfloat16).eps
    for name, value, ref in [("logits", y, y_ref), *((n, g, grads_ref[n]) for n, g in grads.items())]:
        exact = y_64 if name == "logits" else grads_64[name]
        assert _error(value, exact) <= 2 * _error(ref, exact) + eps, name
