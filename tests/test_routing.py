"""Per-sample routing in the core, on the toy methods of every site: each sample equals itself run alone."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import grafting
from grafting.model.routing import BASE
from grafting.testing import assert_close, model_output, sample_inputs, tiny_model
from tests.helpers import ARCHS, ATTENTION, TASK_TYPES
from tests.toy_methods import ToyDeltaConfig, ToyInputConfig, ToyOutputConfig, ToyPlugin, ToySharedConfig

BATCH = 4
NAMES = ("delta", "output", "input", "shared", BASE)


def _model(arch: str, seed: int) -> grafting.PeftModel:
    """A float64 mixed model with one toy adapter of each site (and a shared-state one) on the attention."""
    targets = {"target_modules": ATTENTION[arch], "task_type": TASK_TYPES[arch]}
    model = grafting.get_peft_model(
        tiny_model(arch, seed=seed).double(), ToyDeltaConfig(**targets), adapter_name="delta", mixed=True
    )
    model.add_adapter("output", ToyOutputConfig(**targets))
    model.add_adapter("input", ToyInputConfig(**targets))
    model.add_adapter("shared", ToySharedConfig(seed=seed, **targets))
    return model


def _alone(model: grafting.PeftModel, arch: str, index: int, name: str, seed: int) -> torch.Tensor:
    sample = {k: v[index : index + 1] for k, v in sample_inputs(arch, batch=BATCH, seed=seed).items()}
    if name == BASE:
        with model.disable_adapter():
            return model_output(model, sample)
    model.set_adapter(name)
    return model_output(model, sample)


@settings(max_examples=3, deadline=None)
@pytest.mark.parametrize("arch", ARCHS)
@given(seed=st.integers(0, 2**16), names=st.lists(st.sampled_from(NAMES), min_size=BATCH, max_size=BATCH))
def test_each_sample_goes_through_its_adapter(toy_methods: ToyPlugin, arch: str, seed: int, names: list[str]) -> None:
    model = _model(arch, seed)
    inputs = sample_inputs(arch, batch=BATCH, seed=seed)
    routed = model_output(model, {**inputs, "adapter_names": names})
    with model.disable_adapter():
        base = model_output(model, inputs)
    for i, name in enumerate(names):
        alone = _alone(model, arch, i, name, seed)
        if name == BASE:
            assert_close(routed[i : i + 1], alone, msg=f"sample {i} through the base")
        else:
            assert_close(routed[i : i + 1], alone, changed_from=base[i : i + 1], msg=f"sample {i} through {name!r}")


def test_one_adapter_for_every_sample_and_the_active_one_stays(toy_methods: ToyPlugin) -> None:
    model = _model("llama", 0)
    inputs = sample_inputs("llama", batch=3)
    model.set_adapter("input")
    expected = model_output(model, inputs)
    model.set_adapter(["delta", "output"])
    assert_close(model_output(model, {**inputs, "adapter_names": ["input"] * 3}), expected)
    assert model.active_adapters == ["delta", "output"]


def test_routing_errors(toy_methods: ToyPlugin) -> None:
    model = _model("llama", 0)
    inputs = sample_inputs("llama", batch=3)
    with pytest.raises(grafting.AdapterNotFoundError, match="nope"):
        model_output(model, {**inputs, "adapter_names": ["delta", "nope", BASE]})
    with pytest.raises(grafting.AdapterStateError, match="2 entries but the batch has 3"):
        model_output(model, {**inputs, "adapter_names": ["delta", "output"]})
    model.set_adapter("delta")
    model.merge_adapter()
    with pytest.raises(grafting.AdapterStateError, match="unmerged"):
        model_output(model, {**inputs, "adapter_names": ["delta", "output", BASE]})
