"""A plain adapter merged while a DoRA adapter on the same layer stays active and unmerged would change the
weight DoRA takes its norms of (PEFT merges and its output changes): refused, the model untouched; merging
DoRA alone, or both, keeps the output."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_option_helpers import TOL, randomize, run, weights_of, zoo

from grafting import GraftingWarning, IA3Config, LoraConfig, MergeError, get_peft_model
from grafting.testing import assert_close, assert_identical

LAYERS = ["emb", "conv1", "conv2", "conv3", "head"]


@settings(max_examples=5, deadline=None)
@given(
    layers=st.lists(st.sampled_from(LAYERS), min_size=1, max_size=3, unique=True),
    r=st.integers(1, 3),
    other=st.sampled_from(["lora", "ia3"]),
    seed=st.integers(0, 100),
)
def test_plain_merge_beside_an_unmerged_dora(layers: list[str], r: int, other: str, seed: int) -> None:
    if other == "ia3":
        layers = sorted({*layers, "head"})  # IA3 adapts the linear head only here
        second: Any = IA3Config(target_modules=["head"], feedforward_modules=[])
    else:
        second = LoraConfig(r=r, target_modules=layers, init_lora_weights=False)
    model = get_peft_model(zoo(), LoraConfig(r=r, target_modules=layers, use_dora=True), mixed=True)
    model.add_adapter("plain", second)
    model.set_adapter(["default", "plain"])
    randomize(model.base_model, seed, keyword="lora_")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:  # scales away from zero, so that an unmerge divides safely
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(seed))
    base = run(zoo())
    out = run(model)
    before = weights_of(model)
    with pytest.raises(MergeError, match="reads the layer's own weight"):
        model.merge_adapter(["plain"])
    assert_identical(weights_of(model), before)
    assert_identical(run(model), out)
    model.merge_adapter(["default"])  # DoRA alone: it merges from the weight it reads
    assert_close(run(model), out, changed_from=base, **TOL)
    with pytest.warns(GraftingWarning, match="already merged"):
        model.merge_adapter(["plain"])  # now the plain one may follow
    assert_close(run(model), out, changed_from=base, **TOL)
    model.unmerge_adapter()
    assert_close(run(model), out, **TOL)
    model.set_adapter(["plain"])  # without DoRA active, the plain adapter merges alone
    alone = run(model)
    model.merge_adapter(["plain"])
    assert_close(run(model), alone, changed_from=base, **TOL)


def test_the_oracle_changes_its_output() -> None:
    """PEFT 0.21 merges the plain adapter and DoRA's output moves: the case grafting refuses."""
    import warnings

    import peft

    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(6, 5)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(lin, peft.LoraConfig(target_modules=["0"], init_lora_weights=False), "a")
        theirs.add_adapter("d", peft.LoraConfig(target_modules=["0"], use_dora=True, init_lora_weights=False))
    theirs.base_model.set_adapter(["a", "d"])
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        before = theirs(x)
        theirs.base_model.model[0].merge(adapter_names=["a"])
        assert (theirs(x) - before).abs().max() > 1e-3


def test_activating_dora_beside_a_merged_adapter_unmerges_the_layer() -> None:
    """A DoRA adapter activated while another is merged into its layer would read a changed weight: set_adapter
    unmerges that layer first (PEFT unmerges on set_adapter too)."""
    model = get_peft_model(zoo(), LoraConfig(r=2, target_modules=["head"], use_dora=True), mixed=True)
    model.add_adapter("plain", LoraConfig(r=2, target_modules=["head"], init_lora_weights=False))
    model.set_adapter(["default", "plain"])
    randomize(model.base_model, 3, keyword="lora_")
    both = run(model)
    model.set_adapter(["plain"])
    model.merge_adapter()
    model.set_adapter(["default", "plain"])
    assert model.base_model.model.head.merged == []
    assert_close(run(model), both, changed_from=run(zoo()), **TOL)
