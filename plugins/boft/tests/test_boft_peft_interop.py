"""PEFT is the oracle: BOFT adapters saved by either library load in the other with the same outputs,
the same merged weights, the same gradients and the same dropout draws."""

from __future__ import annotations

from typing import Any

import peft
import pytest
import torch
from boft_helpers import TARGETS, base, boft_params, loss, output, peft_key, randomize, use_peft_butterflies, weights_of

from grafting import PeftModel, get_peft_model
from grafting.testing import assert_close, assert_same_gradients, check_peft_loads_the_save
from grafting_boft import BOFTConfig

TOL = {"rtol": 1e-10, "atol": 1e-10}  # float64 against float64: far below any wrong rotation


@pytest.fixture(autouse=True)
def _peft_butterflies(monkeypatch: pytest.MonkeyPatch) -> None:
    use_peft_butterflies(monkeypatch)


def _options(arch: str, variant: int) -> dict[str, Any]:
    names = TARGETS[arch]
    if arch == "conv":  # 54 inputs of the 3×3 layer: blocks of 3, one factor; the 1×1 layer's 4 take two
        names = ["spatial"] if variant == 0 else ["pointwise"]
    options = [
        {"boft_block_size": 3 if arch == "conv" else 2, "boft_n_butterfly_factor": 1, "target_modules": names},
        {"boft_block_size": 2, "boft_n_butterfly_factor": 2, "target_modules": names},
        {"boft_block_size": 0, "boft_block_num": 4, "boft_n_butterfly_factor": 3, "target_modules": names},
    ][variant]
    return {**options, "init_weights": False}


def _peft_model(arch: str, options: dict[str, Any], seed: int) -> Any:
    theirs = peft.get_peft_model(base(arch), peft.BOFTConfig(**options))
    randomize(theirs, seed)
    return theirs.eval()


CASES = [("llama", 0), ("llama", 1), ("llama", 2), ("gpt2", 1), ("bert", 2), ("t5", 1), ("conv", 0), ("conv", 1)]


@pytest.mark.parametrize(("arch", "variant"), CASES)
def test_peft_saves_grafting_loads(arch: str, variant: int, tmp_path) -> None:
    theirs = _peft_model(arch, _options(arch, variant), seed=variant)
    expected = output(theirs, arch)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(base(arch), tmp_path)
    assert {peft_key(n) for n in boft_params(ours)} == set(boft_params(theirs))
    assert_close(output(ours, arch), expected, changed_from=output(base(arch), arch), **TOL)


@pytest.mark.parametrize(("arch", "variant"), [("llama", 2), ("bert", 1), ("t5", 0), ("conv", 0)])
def test_merged_weights_equal_peft(arch: str, variant: int, tmp_path) -> None:
    theirs = _peft_model(arch, _options(arch, variant), seed=10 + variant)
    theirs.save_pretrained(tmp_path)
    merged = PeftModel.from_pretrained(base(arch), tmp_path).merge_and_unload()
    reference = theirs.merge_and_unload()
    assert_close(weights_of(merged), weights_of(reference), **TOL, msg="merged weights")


@pytest.mark.parametrize("arch", sorted(TARGETS))
def test_grafting_saves_peft_loads(arch: str, tmp_path) -> None:
    ours = get_peft_model(base(arch), BOFTConfig(**_options(arch, 1)))
    ours.add_adapter("other", BOFTConfig(**_options(arch, 0)))
    randomize(ours, 2)
    check_peft_loads_the_save(ours, lambda: base(arch), lambda model: output(model, arch), tmp_path, **TOL)


@pytest.mark.parametrize(("arch", "variant"), [("llama", 1), ("t5", 2), ("conv", 0)])
def test_training_gradients_equal_peft(arch: str, variant: int, tmp_path) -> None:
    theirs = _peft_model(arch, _options(arch, variant), seed=3)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(base(arch), tmp_path, is_trainable=True).eval()
    loss(theirs, arch).backward()
    loss(ours, arch).backward()
    assert_same_gradients(boft_params(ours), boft_params(theirs))


def test_block_dropout_draws_as_peft_does(tmp_path) -> None:
    options = {**_options("llama", 1), "boft_dropout": 0.5}
    theirs = _peft_model("llama", options, seed=4)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(base("llama"), tmp_path, is_trainable=True)
    with torch.no_grad():
        without = loss(ours.eval(), "llama")
    theirs.train()
    ours.train()
    for seed in range(3):
        torch.manual_seed(seed)
        expected = loss(theirs, "llama")
        torch.manual_seed(seed)
        assert_close(loss(ours, "llama"), expected, changed_from=without, **TOL, msg=f"draw {seed}")
