"""What an adapted layer derives once and keeps (its live adapters) follows every change made after a call.

Each test calls the model first (so anything kept from that call is in place), changes something that
decides the forward, and compares the next call with the layer-by-layer formula computed in float64
from the weights as they are then. Three sibling projections read one input, so shared-input grouping
takes part wherever it applies.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable

import pytest
import torch
from torch import nn

import grafting
from grafting.model.grouping import shared_input_grouping
from grafting.model.layer import AdaptedLayer
from grafting.testing import assert_close
from grafting_lora.layers import LoraLinear

NAMES = ("q", "k", "v")


class Siblings(nn.Module):
    """Three projections of one input, side by side."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def _model(dtype: torch.dtype = torch.bfloat16, dropout: float = 0.0) -> grafting.PeftModel:
    torch.manual_seed(0)
    config = grafting.LoraConfig(r=4, lora_alpha=8, target_modules=list(NAMES), init_lora_weights=False)
    model = grafting.get_peft_model(Siblings().to(dtype), config, adapter_name="a")
    model.add_adapter("b", grafting.LoraConfig(r=2, lora_alpha=2, target_modules=list(NAMES), init_lora_weights=False))
    model.add_adapter("c", grafting.LoraConfig(r=4, lora_dropout=dropout, target_modules=list(NAMES)))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLinear):
                module.lora_B.weight.normal_()
    return model


def _layers(model: nn.Module) -> list[AdaptedLayer]:
    return [m for m in model.modules() if isinstance(m, AdaptedLayer)]


def _expected(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Each layer's ``W·x + b`` plus each live adapter's ``scaling·B·A·x`` (no dropout), in float64."""
    outputs = []
    wide = x.double()
    for layer in _layers(model):
        base = layer.base_layer
        y = wide @ base.weight.double().T + base.bias.double()
        if not layer.disabled:
            for name in layer.active:
                if name in layer.merged:
                    continue
                adapter = layer.adapters[name]
                y = y + (wide @ adapter.lora_A.weight.double().T @ adapter.lora_B.weight.double().T) * adapter.scaling
        outputs.append(y)
    return torch.cat(outputs, dim=-1)


def _input(dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2)).to(dtype)


def _close(actual: torch.Tensor, expected: torch.Tensor, changed_from: torch.Tensor | None = None) -> None:
    """``actual`` (half precision) equals the float64 ``expected`` up to a few roundings of the largest term;
    ``changed_from`` (another output) lies ten times that far from it."""
    slack = 4 * torch.finfo(actual.dtype).eps * expected.abs().max().item()
    assert_close(actual.double(), expected, rtol=0.0, atol=slack)
    if changed_from is not None:
        assert (changed_from.double() - expected).abs().max().item() > 10 * slack


def _check(model: nn.Module, x: torch.Tensor, changed_from: torch.Tensor | None = None) -> torch.Tensor:
    """Two calls (the second after the first) both equal the formula; returns the model's output."""
    expected = _expected(model, x)
    for _ in range(2):
        out = model(x).detach()
        _close(out, expected, changed_from)
    return out


def _base(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with model.disable_adapter():
        return model(x).detach()


@pytest.mark.parametrize("grouping", [True, False])
def test_switching_the_active_adapter_after_a_call(grouping: bool) -> None:
    model = _model()
    x = _input()
    base = _base(model, x)
    with shared_input_grouping(grouping):
        first = _check(model, x, base)
        model.set_adapter("b")
        second = _check(model, x, base)
        _close(second, _expected(model, x), changed_from=first)  # the switch changed the output
        model.base_model.set_adapter(["a", "b"])
        _check(model, x, base)
        for layer in _layers(model):  # assigned directly, as the model-wide bookkeeping does
            layer.active = ("b",)
        _check(model, x, base)


@pytest.mark.parametrize("grouping", [True, False])
def test_disabling_merging_adding_and_deleting_after_a_call(grouping: bool) -> None:
    model = _model()
    x = _input()
    base = _base(model, x)
    with shared_input_grouping(grouping):
        _check(model, x, base)
        with model.disable_adapter():
            _close(model(x), _expected(model, x))
            assert all(layer.disabled for layer in _layers(model))
        _check(model, x, base)
        model.merge_adapter()  # the merged adapter leaves the forward: counted once, in the weights
        assert all(layer.merged == ["a"] for layer in _layers(model))
        _check(model, x)
        model.unmerge_adapter()
        _check(model, x, base)
        model.add_adapter("d", grafting.LoraConfig(r=3, target_modules=list(NAMES), init_lora_weights=False))
        with torch.no_grad():
            for layer in _layers(model):
                layer.adapters["d"].lora_B.weight.normal_()
        model.set_adapter("d")
        _check(model, x, base)
        model.delete_adapter("d")  # another adapter becomes active, as in PEFT
        assert all("d" not in layer.adapters and "d" not in layer.active for layer in _layers(model))
        _check(model, x)
        for layer in _layers(model):
            layer.set_active([])
        _close(model(x), base.double())


def test_train_eval_and_the_dropout_probability_after_a_call() -> None:
    """Dropout draws only in training and at its probability of the moment; grouping joins only without it."""
    model = _model(dropout=0.5)
    model.set_adapter("c")
    with torch.no_grad():
        for layer in _layers(model):
            layer.adapters["c"].lora_A.weight.normal_()
    x = _input()
    base = _base(model, x)
    model.eval()
    expected = _check(model, x, base)
    model.train()
    torch.manual_seed(5)
    dropped = model(x).detach()
    assert (dropped - expected).abs().max() > 0.1 * expected.abs().max()  # masks drawn: another output
    for layer in _layers(model):
        layer.adapters["c"].lora_dropout.p = 0.0
    _check(model, x, base)  # p = 0 in training: no mask, the formula (and grouped again)
    for layer in _layers(model):
        layer.adapters["c"].lora_dropout.p = 1.0
    _close(model(x), base.double())  # everything dropped: the base output
    model.eval()
    _check(model, x, base)


@pytest.mark.parametrize("grouping", [True, False])
def test_moving_to_another_dtype_and_turning_the_fast_path_off_after_a_call(grouping: bool) -> None:
    model = _model()
    x = _input()
    with shared_input_grouping(grouping):
        _check(model, x, _base(model, x))
        model.to(torch.float32)  # half precision's fused path no longer applies: the reference
        x32 = x.float()
        _check(model, x32, _base(model, x32))
        model.to(torch.bfloat16)
        for layer in _layers(model):
            layer.adapters["a"].fused = False
        _check(model, x, _base(model, x))
        for layer in _layers(model):
            del layer.adapters["a"].fused  # the class default again
        _check(model, x, _base(model, x))


def test_a_hook_added_after_a_call_is_run() -> None:
    """A forward hook on a base layer, added after a call, turns the fused path off there: the hook runs."""
    model = _model()
    x = _input()
    _check(model, x, _base(model, x))
    seen: list[torch.Tensor] = []
    handle = _layers(model)[0].base_layer.register_forward_hook(lambda m, i, o: seen.append(o))
    _check(model, x)
    assert len(seen) == 2
    handle.remove()


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))], ids=["deepcopy", "pickle"])
def test_copies_compute_with_their_own_adapters(copier: Callable[[nn.Module], nn.Module]) -> None:
    """A copy made after a call keeps no reference to the original's adapters; both then change apart."""
    model = _model()
    x = _input()
    base = _base(model, x)
    _check(model, x, base)
    copied = copier(model)
    with torch.no_grad():
        for layer in _layers(copied):
            layer.adapters["a"].lora_B.weight.mul_(-1.0)
    _check(copied, x, base)
    _check(model, x, base)
    copied.set_adapter("b")
    _check(copied, x, base)
    assert all(layer.active == ("a",) for layer in _layers(model))
    _check(model, x, base)


def _replicate(module: nn.Module, scaled: set[nn.Module]) -> nn.Module:
    """A replica of ``module``'s tree as ``DataParallel`` makes one (shallow copies, parameters held as plain
    attributes), with the weights of the modules in ``scaled`` tripled."""
    copies = {m: m._replicate_for_data_parallel() for m in module.modules()}
    for original, replica in copies.items():
        for key, child in original._modules.items():
            replica._modules[key] = None if child is None else copies[child]
        for key, param in original._parameters.items():
            if param is None:
                replica._parameters[key] = None
            else:
                setattr(replica, key, param.detach() * (3 if original in scaled else 1))
    return copies[module]


def test_a_data_parallel_replica_computes_with_its_own_parameters() -> None:
    """A replica shares the layer's attributes but holds its own adapter modules and parameters."""
    model = _model()
    x = _input()
    _check(model, x, _base(model, x))
    replica = _replicate(model.base_model.model, {layer.adapters["a"].lora_B for layer in _layers(model)})
    assert "weight" not in _layers(replica)[0].adapters["a"].lora_B._parameters
    _close(replica(x), _expected(replica, x), changed_from=model(x).detach())
    _check(model, x)
