"""get_layer_status / get_model_status against PEFT's: the same fields and, for the same model, the same answers."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import peft
import pytest

import grafting
from tests.helpers import base_model

#: Fields whose values are PEFT's own class names (grafting's layers are other classes).
OWN_FIELDS = {"module_type", "adapter_model_type"}


def build(library: Any) -> Any:
    """Two LoRA adapters and a modules_to_save head; the second inactive, the first merged on its layers."""
    config = {"r": 2, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = library.get_peft_model(base_model("llama"), library.LoraConfig(**config))
        model.add_adapter("other", library.LoraConfig(r=2, target_modules=["q_proj"]))
        model.merge_adapter()
    return model


def comparable(status: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(status).items() if k not in OWN_FIELDS}


def test_status_classes_have_peft_s_fields() -> None:
    for ours, theirs in [
        (grafting.TunerLayerStatus, peft.peft_model.TunerLayerStatus),
        (grafting.TunerModelStatus, peft.peft_model.TunerModelStatus),
    ]:
        assert [f.name for f in dataclasses.fields(ours)] == [f.name for f in dataclasses.fields(theirs)]


def test_layer_status_matches_peft_s() -> None:
    theirs = {s.name: comparable(s) for s in peft.get_layer_status(build(peft))}
    ours = {s.name: comparable(s) for s in grafting.get_layer_status(build(grafting))}
    assert ours == theirs


def test_model_status_matches_peft_s() -> None:
    theirs, ours = peft.get_model_status(build(peft)), grafting.get_model_status(build(grafting))
    assert comparable(ours) == comparable(theirs)
    assert ours.merged_adapters == "irregular"  # merged on its layers, but a modules_to_save copy never is
    assert ours.requires_grad == {"default": True, "other": False}


def test_a_model_without_adapter_layers_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="No adapter layers found"):
        grafting.get_layer_status(base_model("llama"))
