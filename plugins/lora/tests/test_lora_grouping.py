"""LoRA under shared-input grouping: q/k/v's and gate/up's A products as one matmul, the same results.

Grouped and ungrouped runs of one model are each compared with the float64 model (grouping may
not add error of its own): in bfloat16 any sum accumulated in another order moves a gradient
deep in the model by a few percent, so the two half-precision results are not compared directly.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import grafting
from grafting.testing import assert_close, tiny_gpt2, tiny_llama
from grafting_lora.layers import LoraLinear

MM = ("aten.mm.default", "aten.addmm.default", "aten.addmm_.default", "aten.bmm.default", "aten.baddbmm.default")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.products = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if str(func) in MM:
            self.products += 1
        return func(*args, **(kwargs or {}))


def _model(dtype: torch.dtype, arch: str = "llama", autocast: bool = True, **options: Any) -> grafting.PeftModel:
    base = (tiny_llama(hidden=32) if arch == "llama" else tiny_gpt2(hidden=32)).to(dtype)
    torch.manual_seed(3)
    defaults = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False}
    config = grafting.LoraConfig(**{**defaults, "fan_in_fan_out": arch == "gpt2", **options})
    return grafting.get_peft_model(base, config, autocast_adapter_dtype=autocast)


def _step(model: nn.Module, ids: torch.Tensor, grouping: bool, **call: Any) -> tuple[torch.Tensor, dict, int]:
    counter = Count()
    with grafting.shared_input_grouping(grouping), counter:
        torch.manual_seed(5)  # dropout draws the same masks on both paths
        logits = model(input_ids=ids, **call).logits
        weights = torch.linspace(-1, 1, logits.shape[-1]).to(logits.dtype)
        (logits * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads, counter.products


def _error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    return ((actual.double() - exact.double()).norm() / exact.double().norm().clamp_min(1e-30)).item()


def _compare(model: grafting.PeftModel, ids: torch.Tensor, **call: Any) -> tuple[int, int]:
    """Grouped and ungrouped against the float64 model, outputs and every gradient; the products counted."""
    _step(model, ids, True, **call)  # the first call learns the groups
    y, grads, grouped = _step(model, ids, True, **call)
    y_ref, grads_ref, plain = _step(model, ids, False, **call)
    exact_model = copy.deepcopy(model).double()
    y_64, grads_64, _ = _step(exact_model, ids, False, **call)
    assert grads.keys() == grads_ref.keys() == grads_64.keys()
    assert grads, "the adapters must train"
    eps = torch.finfo(y.dtype).eps
    assert _error(y_ref, y_64) > 0 or y.dtype == torch.float64
    for name, value, ref in [("logits", y, y_ref), *((n, g, grads_ref[n]) for n, g in grads.items())]:
        exact = y_64 if name == "logits" else grads_64[name]
        assert _error(value, exact) <= 2 * _error(ref, exact) + eps, name
    return grouped, plain


def _layers_per_block(model: grafting.PeftModel) -> int:
    return len(model.base_model.model.model.layers)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_q_k_v_and_gate_up_share_one_product(dtype: torch.dtype) -> None:
    """Per decoder layer: q/k/v's A products one matmul instead of three and gate/up's one instead of two, in
    forward, for the input's gradient and for A's gradient (3 × 3 fewer products a decoder layer)."""
    model = _model(dtype)
    model.train()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    grouped, plain = _compare(model, ids)
    # the first layer's q/k/v read the frozen embeddings: no input gradient there, on either path
    assert plain - grouped == 3 * 3 * _layers_per_block(model) - 2
    with torch.no_grad():
        counts = []
        for on in (True, False):
            with grafting.shared_input_grouping(on), Count() as counter:
                model(input_ids=ids)
            counts.append(counter.products)
    assert counts[1] - counts[0] == 3 * _layers_per_block(model)


def test_the_fused_node_takes_the_grouped_product() -> None:
    """Alone on its layer, LoRA still runs as one node when its first product comes from the group."""
    model = _model(torch.bfloat16)
    ids = torch.randint(0, 64, (2, 5))
    attention = model.base_model.model.model.layers[0].self_attn
    seen: list[str] = []
    attention.k_proj.register_forward_hook(lambda m, a, out: seen.append(type(out.grad_fn).__name__))
    model(input_ids=ids)
    model(input_ids=ids)
    assert [f() for f in attention.q_proj.group_state.followers] == [attention.k_proj, attention.v_proj]
    assert all("LoraLinearFunction" in name for name in seen)


@settings(max_examples=4, deadline=None)
@given(
    ranks=st.lists(st.integers(1, 6), min_size=len(PROJECTIONS), max_size=len(PROJECTIONS)),
    adapted=st.lists(st.sampled_from(PROJECTIONS), min_size=2, max_size=len(PROJECTIONS), unique=True),
    dropout=st.sampled_from([0.0, 0.2]),
    autocast=st.booleans(),
)
def test_ranks_targets_and_dropout(ranks: list[int], adapted: list[str], dropout: float, autocast: bool) -> None:
    """Different ranks per sibling, siblings left unadapted, dropout (those adapters not grouped), bf16 adapters."""
    pattern = {name: rank for name, rank in zip(PROJECTIONS, ranks, strict=True) if name in adapted}
    model = _model(
        torch.bfloat16, autocast=autocast, target_modules=adapted, rank_pattern=pattern, lora_dropout=dropout
    )
    model.train()
    _compare(model, torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1)))


STATES = ("eval", "two active", "merged", "disabled", "routed", "dora", "gpt2", "ungrouped reference")


@pytest.mark.parametrize("state", STATES)
def test_states(state: str) -> None:
    """Several adapters active (the composed path takes the products), one merged, the model disabled,
    per-sample routing, DoRA (never grouped), GPT-2 (no siblings), ``fused = False`` (the reference)."""
    model = _model(torch.bfloat16, arch="gpt2" if state == "gpt2" else "llama", use_dora=state == "dora")
    ids = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(2))
    call: dict[str, Any] = {}
    if state in ("two active", "merged", "routed"):
        torch.manual_seed(4)
        model.add_adapter("b", grafting.LoraConfig(r=2, target_modules=["q_proj", "k_proj"], init_lora_weights=False))
        model.base_model.set_adapter(["default", "b"])
        if state == "merged":
            model.base_model.model.model.layers[0].self_attn.q_proj.merge(["b"])
        if state == "routed":
            call["adapter_names"] = ["b", "__base__", "default", "b"]
    if state == "eval":
        model.eval()
    if state == "ungrouped reference":
        for module in model.modules():
            if isinstance(module, LoraLinear):
                module.fused = False
    if state == "disabled":
        with model.disable_adapter(), torch.no_grad():
            counts = []
            for on in (True, True, False):
                with grafting.shared_input_grouping(on), Count() as counter:
                    model(input_ids=ids)
                counts.append(counter.products)
        assert counts[1] == counts[2]
        return
    grouped, plain = _compare(model, ids, **call)
    if state in ("dora", "gpt2", "routed", "ungrouped reference"):
        assert grouped == plain
    else:
        assert grouped < plain


def test_gradient_checkpointing_recomputes_what_the_forward_saved() -> None:
    """transformers' (non-reentrant) gradient checkpointing: the recomputation must save what the forward
    saved, so a group learned in between must not change it; the gradients are those of the plain run."""
    model = _model(torch.bfloat16)
    model.base_model.model.gradient_checkpointing_enable()
    model.train()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(4))
    for _ in range(2):  # the first step would learn groups between the forward and its recomputation
        y, grads, _ = _step(model, ids, True)
    y_ref, grads_ref, _ = _step(model, ids, False)
    assert_close(y, y_ref)
    for name, grad in grads.items():
        assert_close(grad, grads_ref[name], msg=name)
