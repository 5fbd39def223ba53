"""PEFT is the oracle: LN-tuning adapters saved by either library load in the other with the same
outputs, the same merged weights and the same gradients."""

from __future__ import annotations

import peft
import pytest
from ln_tuning_helpers import TARGETS, base, copies, output, peft_key, randomize, train_output, weights_of

from grafting import PeftModel, get_peft_model
from grafting.testing import assert_close, assert_same_gradients, check_peft_loads_the_save
from grafting_ln_tuning import LNTuningConfig

ARCHS = ["llama", "gpt2", "bert", "t5", "conv"]
TOL = {"rtol": 1e-12, "atol": 1e-12}  # float64, the same operations: equal up to the last bits


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_saves_grafting_loads(arch: str, tmp_path) -> None:
    theirs = peft.get_peft_model(base(arch), peft.LNTuningConfig(target_modules=TARGETS[arch]))
    randomize(theirs, 1)
    expected = output(theirs, arch)
    theirs.save_pretrained(tmp_path)

    ours = PeftModel.from_pretrained(base(arch), tmp_path)
    assert {peft_key(n) for n in copies(ours)} == set(copies(theirs))
    assert_close(output(ours, arch), expected, changed_from=output(base(arch), arch), **TOL)
    merged, reference = weights_of(ours.merge_and_unload()), weights_of(theirs.merge_and_unload())
    assert_close(merged, reference, **TOL, msg="merged weights")


@pytest.mark.parametrize("arch", ARCHS)
def test_grafting_saves_peft_loads(arch: str, tmp_path) -> None:
    ours = get_peft_model(base(arch), LNTuningConfig(target_modules=TARGETS[arch]))
    ours.add_adapter("other", LNTuningConfig(target_modules=TARGETS[arch]))
    randomize(ours, 2)
    check_peft_loads_the_save(ours, lambda: base(arch), lambda model: output(model, arch), tmp_path, **TOL)


@pytest.mark.parametrize("arch", ["llama", "conv"])
def test_training_gradients_equal_peft(arch: str, tmp_path) -> None:
    theirs = peft.get_peft_model(base(arch), peft.LNTuningConfig(target_modules=TARGETS[arch]))
    randomize(theirs, 3)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(base(arch), tmp_path, is_trainable=True)
    train_output(theirs, arch).backward()
    train_output(ours, arch).backward()
    trained = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert set(trained) == set(copies(ours))
    assert_same_gradients(trained, copies(theirs), rtol=1e-10, atol=1e-10)
