"""Per-sample LoRA adapters (DoRA, embeddings, heads): ``model(**inputs, adapter_names=[...])`` equals each sample run alone."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import grafting
from grafting.model.routing import BASE
from grafting.testing import assert_close
from tests.helpers import (
    ARCHS,
    adapted,
    base_logits,
    inputs,
    logits,
    lora,
    lora_configs,
    model_output,
    randomize,
)

BATCH = 4
#: float64 sums of a few dozen terms of order 1: rounding stays far below this, a wrong route far above
TIGHT = {"rtol": 1e-12, "atol": 1e-12}
#: Another route for a sample, to check that its own route made a difference.
OTHER_ROUTE = {"default": "other", "other": BASE, BASE: "default"}


def _two_adapters(arch: str, first: Any, second: Any) -> Any:
    """Two random adapters on a float64 model: routing is checked where rounding cannot blur it."""
    model = adapted(arch, first, dtype=torch.float64)
    model.add_adapter("other", second)
    randomize(model, 9)
    return model


def _alone(model: Any, arch: str, index: int, name: str) -> torch.Tensor:
    """Sample ``index`` run by itself, through adapter ``name`` (or the base)."""
    sample = {k: v[index : index + 1] for k, v in inputs(arch, BATCH).items()}
    if name == BASE:
        with model.disable_adapter():
            return model_output(model, sample)
    model.set_adapter(name)
    return model_output(model, sample)


@pytest.mark.parametrize("arch", ARCHS)
@given(data=st.data(), names=st.lists(st.sampled_from(["default", "other", BASE]), min_size=BATCH, max_size=BATCH))
def test_each_sample_goes_through_its_adapter(arch: str, data: st.DataObject, names: list[str]) -> None:
    model = _two_adapters(arch, data.draw(lora_configs(arch)), data.draw(lora_configs(arch)))
    routed = logits(model, arch, BATCH, adapter_names=names)
    for i, name in enumerate(names):
        changed_from = _alone(model, arch, i, OTHER_ROUTE[name])
        expected = _alone(model, arch, i, name)
        assert_close(
            routed[i : i + 1], expected, changed_from=changed_from, **TIGHT, msg=f"sample {i} through {name!r}"
        )


@pytest.mark.parametrize("arch", ARCHS)
def test_base_for_every_sample_is_the_base_model(arch: str) -> None:
    model = _two_adapters(arch, lora(arch, use_dora=True), lora(arch, target_modules="all-linear"))
    routed = logits(model, arch, adapter_names=[BASE] * 3)
    base = base_logits(arch, dtype=torch.float64)
    assert_close(routed, base, changed_from=logits(model, arch), **TIGHT, msg="every sample to the base")


@pytest.mark.parametrize("arch", ARCHS)
def test_one_adapter_for_every_sample_is_that_adapter(arch: str) -> None:
    model = _two_adapters(arch, lora(arch), lora(arch, r=2, target_modules="all-linear"))
    model.set_adapter("other")
    expected = logits(model, arch)
    model.set_adapter("default")
    routed = logits(model, arch, adapter_names=["other"] * 3)
    assert_close(routed, expected, changed_from=logits(model, arch), **TIGHT, msg="all samples to 'other'")
    assert model.active_adapters == ["default"]  # routing does not change the active adapter


def test_classification_heads_are_routed_too() -> None:
    """BERT (SEQ_CLS) trains a classifier copy per adapter; each sample uses its adapter's copy."""
    model = _two_adapters("bert", lora("bert"), lora("bert", target_modules=["key"]))
    heads = [w for _, w in model.base_model.save_wrappers()]
    assert len(heads) == 1
    assert sorted(heads[0].modules_to_save) == ["default", "other"]
    names = ["other", BASE, "default", "other"]
    routed = logits(model, "bert", BATCH, adapter_names=names)
    for i, name in enumerate(names):
        changed_from = _alone(model, "bert", i, OTHER_ROUTE[name])
        expected = _alone(model, "bert", i, name)
        assert_close(routed[i : i + 1], expected, changed_from=changed_from, msg=f"sample {i} through {name!r}")


def test_routing_errors() -> None:
    model = _two_adapters("llama", lora("llama"), lora("llama"))
    with pytest.raises(grafting.AdapterNotFoundError, match="nope"):
        logits(model, "llama", adapter_names=["default", "nope", BASE])
    with pytest.raises(grafting.AdapterStateError, match="2 entries but the batch has 3"):
        logits(model, "llama", adapter_names=["default", "other"])
    model.merge_adapter()
    with pytest.raises(grafting.AdapterStateError, match="unmerged"):
        logits(model, "llama", adapter_names=["default", "other", BASE])
