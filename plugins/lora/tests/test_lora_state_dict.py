"""``get_peft_model_state_dict(state_dict=...)`` on random LoRA adapters gives what PEFT gives for the same
adapter and the same dict (the semantics themselves are tests/test_training_state_dict.py, on toy methods)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lora_model_helpers import ARCHS, adapted, base_model, lora_configs, randomize

from grafting import get_peft_model_state_dict
from grafting.testing import assert_identical

WRAPPER_INTERNALS = re.compile(r"\.(modules_to_save|original_module)\.")
EXAMPLES = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def shifted(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Another value for every tensor of a state dict (so reading the model instead would show)."""
    return {k: v * 2 + 1 if v.is_floating_point() else v for k, v in state.items()}


@pytest.mark.parametrize("arch", ARCHS)
@EXAMPLES
@given(data=st.data())
def test_given_state_dict_gives_what_peft_gives(arch: str, data: st.DataObject, tmp_path_factory: Any) -> None:
    import peft

    config = data.draw(lora_configs(arch))
    model = adapted(arch, config)
    randomize(model, 3)
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder)
    theirs = peft.PeftModel.from_pretrained(base_model(arch), str(folder))

    # (save_embedding_layers: PEFT's "auto" adds the embeddings when targeted; that choice is not what is tested here)
    ours = get_peft_model_state_dict(model, state_dict=shifted(model.state_dict()), save_embedding_layers=False)
    expected = peft.get_peft_model_state_dict(
        theirs, state_dict=shifted(theirs.state_dict()), save_embedding_layers=False
    )
    # With bias="all" PEFT also returns a head wrapper's internals (`.modules_to_save.bias`, a copy of the saved
    # head's bias, and `.original_module.bias`, the frozen one); grafting writes the head's tensors once.
    expected = {k: v.contiguous() for k, v in expected.items() if not WRAPPER_INTERNALS.search(k)}
    assert_identical(ours, expected, msg="adapter from the given state dict")
    own = get_peft_model_state_dict(model, save_embedding_layers=False)
    assert any(not torch.equal(own[k], ours[k]) for k in own)  # taken from the dict, not from the model
