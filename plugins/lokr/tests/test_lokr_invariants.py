"""The properties every layer method keeps (grafting.testing), over hypothesis-drawn LoKr configs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lokr_helpers import TARGETS, base, inputs, output, randomize

from grafting import get_peft_model
from grafting.testing import check_layer_adapter_invariants
from grafting_lokr import LoKrConfig

ARCHS = ("llama", "gpt2", "bert", "t5", "conv")


@st.composite
def configs(draw: Any, arch: str, **fixed: Any) -> LoKrConfig:
    names = TARGETS[arch]
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True))
    if arch == "bert" and set(chosen) <= {"query", "key"}:
        chosen.append("value")  # tiny BERT's near-uniform attention hides query/key deltas alone
    kwargs: dict[str, Any] = {
        "r": draw(st.integers(1, 4)),
        "alpha": draw(st.sampled_from([1.0, 2.5, 8.0])),
        "decompose_both": draw(st.booleans()),
        "decompose_factor": draw(st.sampled_from([-1, 2, 4])),
        "target_modules": chosen,
        "init_weights": draw(st.sampled_from([True, "lycoris"])),
    }
    if arch == "conv":
        kwargs["use_effective_conv2d"] = draw(st.booleans())
    kwargs.update(fixed)
    return LoKrConfig(**kwargs)


@pytest.mark.parametrize("arch", ARCHS)
@given(data=st.data())
def test_layer_adapter_invariants_hold(arch: str, data: st.DataObject, tmp_path_factory) -> None:
    config = data.draw(configs(arch))
    model = get_peft_model(base(arch), config)
    assert torch.equal(output(model, arch), output(base(arch), arch)), "an initialized adapter is the identity"
    randomize(model, data.draw(st.integers(0, 99)))
    check_layer_adapter_invariants(
        model, inputs(arch, batch=3), lambda: base(arch), str(tmp_path_factory.mktemp("inv"))
    )
