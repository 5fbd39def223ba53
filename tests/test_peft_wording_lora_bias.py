"""lora_bias errors contain PEFT's sentence (user code matches it) and say more; the class is one PEFT's catches.

Each case triggers the error in PEFT (the oracle) and in grafting; PEFT's message must be part of
grafting's, grafting's error must be an instance of PEFT's error class, and grafting's failed merge leaves the
model bit-identical (PEFT's has changed the weight by then).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import peft
import pytest
import torch

import grafting
from grafting.testing import assert_identical
from tests.helpers import base_model


def _raised(action: Callable[[], Any]) -> BaseException:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT and grafting both warn when lora_bias meets a layer without a bias
        try:
            action()
        except Exception as exc:
            return exc
    raise AssertionError("no error raised")


def _merge_without_base_bias(library: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = library.get_peft_model(
            base_model("llama"), library.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True)
        )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(1.0)  # a bias and a delta that are not zero
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        model.merge_adapter()
    finally:
        if library is grafting:  # PEFT has merged the weight by the time it raises; grafting leaves it
            for key, value in model.state_dict().items():
                assert_identical(value, before[key])


CASES: dict[str, Callable[[Any], Any]] = {
    "merge into a layer without a bias": _merge_without_base_bias,
    "on an embedding": lambda lib: lib.get_peft_model(
        base_model("llama"), lib.LoraConfig(r=2, target_modules=["embed_tokens"], lora_bias=True)
    ),
    "with DoRA": lambda lib: lib.LoraConfig(r=2, lora_bias=True, use_dora=True),
    "with a named init": lambda lib: lib.LoraConfig(r=2, lora_bias=True, init_lora_weights="gaussian"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lora_bias_errors_contain_peft_s_sentence(case: str) -> None:
    theirs = _raised(lambda: CASES[case](peft))
    ours = _raised(lambda: CASES[case](grafting))
    assert isinstance(ours, grafting.GraftingError)
    assert isinstance(ours, type(theirs)), (type(ours).__mro__, type(theirs))
    assert str(theirs) in str(ours)
    assert len(str(ours)) > len(str(theirs))  # and says more: which layer, what to do
