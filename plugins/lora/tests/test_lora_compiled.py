"""LoRA under ``torch.compile``: every compiled form of the layer equals eager, in one graph, without recompiles.

``LoraLinear.compiled_form`` picks what the compiler sees: the plain ops (``"ops"``), the autograd
Function traced (``"node"``) or the custom op ``grafting_lora::lora_linear`` (``"op"``). The
``aot_eager`` backend traces forward and backward as Inductor would receive them, without needing a
C++ compiler, so these tests run on any machine.
"""

from __future__ import annotations

import collections
import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters

import grafting
from grafting.testing import assert_close, tiny_llama
from grafting_lora.fused import LoraLinearFunction
from grafting_lora.layers import LoraLinear
from grafting_lora.ops import lora_linear_node, lora_linear_op

pytestmark = pytest.mark.xdist_group("compile")  # dynamo's caches are per process: keep these together

HALF = [torch.bfloat16, torch.float16]
PROJECTIONS = 7  # q, k, v, o, gate, up, down of the one-layer Llama
#: the compiled steps run in float16: a half precision whose roundings leave a tiny model's gradients comparable
DTYPE = torch.float16


class Capture:
    """A ``torch.compile`` backend: AOT autograd's forward and backward graphs kept, run as traced (no codegen)."""

    def __init__(self) -> None:
        self.frames = 0
        self.graphs: dict[str, list[torch.fx.GraphModule]] = {"forward": [], "backward": []}

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.frames += 1
        return aot_autograd(fw_compiler=self._keep("forward"), bw_compiler=self._keep("backward"))(gm, example_inputs)

    def _keep(self, kind: str) -> Callable[..., Any]:
        def compiler(gm: torch.fx.GraphModule, _inputs: list[Any]) -> Callable[..., Any]:
            self.graphs[kind].append(gm)
            return make_boxed_func(gm.forward)

        return compiler

    def ops(self, kind: str) -> collections.Counter[str]:
        """How often each operator is called in the last graph of ``kind``."""
        graph = self.graphs[kind][-1].graph
        return collections.Counter(str(node.target) for node in graph.nodes if node.op == "call_function")


@pytest.fixture
def compiled_form() -> Iterator[Callable[[str], None]]:
    """Sets ``LoraLinear.compiled_form`` for one test and clears dynamo's caches around it."""
    torch._dynamo.reset()
    yield lambda form: setattr(LoraLinear, "compiled_form", form)
    LoraLinear.compiled_form = "ops"
    torch._dynamo.reset()


def _model(dtype: torch.dtype = DTYPE, **options: Any) -> grafting.PeftModel:
    base = tiny_llama(hidden=16, layers=1).to(dtype)
    config = grafting.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False, **options)
    return grafting.get_peft_model(base, config)


def _step(run: Any, model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits of ``run`` (``model`` or its compiled form) and the gradients its loss leaves on ``model``."""
    torch.manual_seed(7)  # dropout draws the same masks in both runs
    out = run(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _same_step(compiled: Any, model: Any, eager: Any, ids: torch.Tensor, base: torch.Tensor) -> None:
    """One step of the compiled model and of its eager copy: the same logits and gradients."""
    logits, grads = _step(compiled, model, ids)
    with grafting.shared_input_grouping(False):  # off under compile too: the same products, in the same order
        logits_ref, grads_ref = _step(eager, eager, ids)
    _close(logits, logits_ref)
    with pytest.raises(AssertionError):  # the adapter moves the logits beyond that tolerance: the base's would fail
        _close(base, logits_ref)
    assert grads.keys() == grads_ref.keys()
    assert len(grads) == 2 * PROJECTIONS + (PROJECTIONS if eager.peft_config["default"].use_dora else 0)
    for name, grad in grads.items():
        _close(grad, grads_ref[name], msg=name)


def _close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    """Equal up to half-precision roundings, norm-relative (as ``test_lora_fast_path`` compares half-precision paths).

    Each form rounds its products in its own order and the compiled model's other ops are decomposed, so an
    entry where a sum cancels may differ by a rounding of the largest: the tensor is compared as a whole.
    """
    assert actual.shape == expected.shape, msg
    assert actual.dtype == expected.dtype, msg
    wide = actual.double(), expected.double()
    error = ((wide[0] - wide[1]).norm() / wide[1].norm()).item()
    assert error <= 4 * torch.finfo(DTYPE).eps, f"{msg}: norm-relative error {error:.2e}"


def _train(compiled: Any, model: Any, eager: Any, ids: torch.Tensor, base: torch.Tensor, steps: int) -> None:
    """``steps`` SGD steps of the compiled model, each checked against eager from the same weights."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(steps):
        _same_step(compiled, model, eager, ids, base)
        opt.step()
        opt.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)
        eager.load_state_dict(model.state_dict())  # roundings do not add up over the steps


# -- the custom op --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [*HALF, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_the_custom_op_registrations_pass_opcheck(dtype: torch.dtype, bias: bool) -> None:
    """Schema, fake kernel, autograd registration and AOT dispatch of ``grafting_lora::lora_linear`` agree with it."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(6, 8, generator=gen).to(dtype)
    b = torch.randn(6, generator=gen).to(dtype) if bias else None
    lora_a = torch.randn(4, 8, generator=gen).requires_grad_()
    lora_b = torch.randn(6, 4, generator=gen).requires_grad_()
    torch.library.opcheck(lora_linear_op, (x, weight, b, lora_a, lora_b, 0.5, 0.0))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("dropout", [0.0, 0.4])
@pytest.mark.parametrize("train_weight", [False, True])
def test_the_custom_op_equals_the_autograd_function(dtype: torch.dtype, dropout: float, train_weight: bool) -> None:
    """Values and gradients (input, A, B, and W and its bias when they train) of the op equal the eager node's."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 24, generator=gen).to(dtype)
    weight = torch.randn(20, 24, generator=gen).to(dtype) / 5
    bias = torch.randn(20, generator=gen).to(dtype)
    lora_a = torch.randn(4, 24, generator=gen) / 5
    lora_b = torch.randn(20, 4, generator=gen)
    upstream = torch.randn(3, 5, 20, generator=gen).to(dtype)

    def run(layer: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias, lora_a, lora_b)]
        if not train_weight:
            leaves[1].requires_grad_(False)
            leaves[2].requires_grad_(False)
        torch.manual_seed(5)  # the same dropout mask on both
        y = layer(*leaves, 1.5, dropout)
        (y * upstream).sum().backward()
        return [y.detach()] + [t.grad for t in leaves if t.requires_grad]

    expected = run(LoraLinearFunction.apply)
    actual = run(lora_linear_node)
    assert len(actual) == len(expected) == (6 if train_weight else 4)
    with torch.no_grad():
        base_out = torch.nn.functional.linear(x, weight, bias)
    assert_close(actual[0], expected[0], changed_from=base_out)
    for got, want in zip(actual[1:], expected[1:], strict=True):
        assert got.dtype == want.dtype
        assert_close(got, want)


def _compose_in_eager(model: Any) -> None:
    """``model``'s LoRA layers compose their plain ops in eager too (no one-node fast path)."""
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.fused_call = lambda *args, **kwargs: None  # type: ignore[method-assign]


# -- a compiled training step ---------------------------------------------------------------------
@pytest.mark.parametrize(("form", "dropout"), [("ops", 0.0), ("node", 0.0), ("op", 0.0), ("op", 0.2)])
def test_a_compiled_lora_step_is_one_graph_equal_to_eager(
    form: str, dropout: float, compiled_form: Callable[[str], None]
) -> None:
    """Logits and gradients equal eager's, step after step and after the adapter's weights are swapped in place;
    one graph, no graph break, never recompiled; with ``"op"`` each projection is one node forward and backward
    (dropout drawn inside it: the same masks as eager's node draws from the same seed)."""
    compiled_form(form)
    model = _model(lora_dropout=dropout)
    eager = copy.deepcopy(model)
    if form == "ops":  # eager composes the same plain ops (its node sums the products in another order)
        _compose_in_eager(eager)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids).logits
    model.train()
    eager.train()
    counters.clear()
    backend = Capture()
    compiled = torch.compile(model, backend=backend)
    _train(compiled, model, eager, ids, base, steps=2)
    with torch.no_grad():  # new adapter values in place (what a hotswap does): the same graph computes them
        for m in (model, eager):
            for name, p in m.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) / 4)
    _same_step(compiled, model, eager, ids, base)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert backend.frames == 1, "one graph, compiled once"
    forward, backward = backend.ops("forward"), backend.ops("backward")
    fused = {"op": PROJECTIONS, "ops": 0, "node": 0}[form]
    assert forward["grafting_lora.lora_linear.default"] == fused
    assert backward["grafting_lora.lora_linear_backward.default"] == fused
    if form == "op":  # the adapter's casts and rank-r products live inside the op
        assert forward["aten.addmm.default"] == 0
    if form == "ops":  # the product and the add left to Inductor: no addmm copying the base output (no bias here)
        assert forward["aten.addmm.default"] == 0
        assert forward["aten.mm.default"] == 3 * PROJECTIONS + 1  # base, x·Aᵀ and low·Bᵀ per projection; the head


def test_a_compiled_dora_step_is_one_graph_equal_to_eager(compiled_form: Callable[[str], None]) -> None:
    """DoRA compiles whole too (the custom op is LoRA's: DoRA composes its plain ops under ``"op"``)."""
    compiled_form("op")
    model = _model(use_dora=True)
    eager = copy.deepcopy(model)
    _compose_in_eager(eager)  # DoRA's plain ops, as the compiled graph composes them
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids).logits
    model.train()
    eager.train()
    backend = Capture()
    compiled = torch.compile(model, backend=backend)
    _train(compiled, model, eager, ids, base, steps=2)
    assert backend.frames == 1, "one graph, compiled once"


def test_disabling_adapters_compiles_one_more_graph_once(compiled_form: Callable[[str], None]) -> None:
    """Disabled (the base model) and enabled each compile once; toggling between them recompiles nothing."""
    compiled_form("op")
    model = _model()
    model.eval()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids).logits
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    backend = Capture()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for _ in range(3):
            with model.disable_adapter():
                assert_close(compiled(input_ids=ids).logits, base)
            assert_close(compiled(input_ids=ids).logits, adapted, changed_from=base)
    assert backend.frames == 2, "one graph per state, each compiled once"
