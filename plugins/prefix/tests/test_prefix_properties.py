"""Properties over random shapes: grafting's virtual tokens compute what PEFT's do, and saving is exact."""

from __future__ import annotations

import tempfile

import peft
import torch
from hypothesis import given
from hypothesis import strategies as st
from prefix_helpers import assert_prompted, configs

from grafting import PeftModel, get_peft_model
from grafting.testing import model_output, sample_inputs, tiny_model

METHODS = ("prompt", "p_mlp", "prefix", "prefix_proj")


@given(
    method=st.sampled_from(METHODS),
    arch=st.sampled_from(("llama", "gpt2")),
    n=st.integers(1, 5),
    batch=st.integers(1, 3),
    length=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_peft_computes_what_grafting_saved(method: str, arch: str, n: int, batch: int, length: int, seed: int) -> None:
    inputs = sample_inputs(arch, batch=batch, length=length, seed=seed)
    torch.manual_seed(seed)
    ours = get_peft_model(tiny_model(arch, seed=seed % 7), configs(method, "CAUSAL_LM", n)[0]).eval()
    expected = model_output(ours, inputs)
    with tempfile.TemporaryDirectory() as folder:
        ours.save_pretrained(folder)
        theirs = peft.PeftModel.from_pretrained(tiny_model(arch, seed=seed % 7), folder).eval()
        again = PeftModel.from_pretrained(tiny_model(arch, seed=seed % 7), folder)
        base = model_output(tiny_model(arch, seed=seed % 7), inputs)
        assert_prompted(model_output(theirs, inputs), expected, base, "in PEFT")
        assert_prompted(model_output(again, inputs), expected, base, "reloaded")
