"""PEFT is the oracle: OFT adapters saved by either library load in the other with the same outputs,
the same merged weights and the same gradients."""

from __future__ import annotations

from typing import Any

import peft
import pytest
import torch
from oft_helpers import ARCHS, TARGETS, base, loss, oft_params, output, peft_key, randomize, weights_of

from grafting import PeftModel, get_peft_model
from grafting.testing import assert_close, assert_same_gradients, check_peft_loads_the_save
from grafting_oft import OFTConfig

TOL = {"rtol": 1e-10, "atol": 1e-10}  # float64 against float64: far below any wrong rotation
#: PEFT's OFT forward on a k×k convolution (k > 1) is not its merge (see the test at the end): those
#: layers are compared with PEFT's merged weights, the 1×1 one with PEFT's forward too
PEFT_FORWARD_TARGETS = {**TARGETS, "conv": ["pointwise"]}


def _options(arch: str, variant: int, targets: dict[str, list[str]] = TARGETS) -> dict[str, Any]:
    names = targets[arch]
    return [
        {"oft_block_size": 4, "r": 0, "target_modules": names, "init_weights": False},
        {"r": 2, "oft_block_size": 0, "use_cayley_neumann": False, "target_modules": names, "init_weights": False},
        {"oft_block_size": 2, "block_share": True, "num_cayley_neumann_terms": 7, "target_modules": names},
    ][variant]


def _peft_model(arch: str, options: dict[str, Any], seed: int) -> Any:
    theirs = peft.get_peft_model(base(arch), peft.OFTConfig(**options))
    randomize(theirs, seed)
    return theirs.eval()


#: every architecture once, every option variant on Llama
CASES = [("llama", 0), ("llama", 1), ("llama", 2), ("gpt2", 1), ("bert", 2), ("t5", 0), ("conv", 1)]


@pytest.mark.parametrize(("arch", "variant"), CASES)
def test_peft_saves_grafting_loads(arch: str, variant: int, tmp_path) -> None:
    theirs = _peft_model(arch, _options(arch, variant, PEFT_FORWARD_TARGETS), seed=variant)
    expected = output(theirs, arch)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(base(arch), tmp_path)
    assert {peft_key(n) for n in oft_params(ours)} == set(oft_params(theirs))
    assert_close(output(ours, arch), expected, changed_from=output(base(arch), arch), **TOL)


@pytest.mark.parametrize(("arch", "variant"), [("llama", 1), ("gpt2", 2), ("bert", 0), ("t5", 2), ("conv", 0)])
def test_merged_weights_equal_peft(arch: str, variant: int, tmp_path) -> None:
    theirs = _peft_model(arch, _options(arch, variant), seed=10 + variant)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(base(arch), tmp_path)
    merged = ours.merge_and_unload()
    reference = theirs.merge_and_unload()
    assert_close(weights_of(merged), weights_of(reference), **TOL, msg="merged weights")
    assert_close(output(merged, arch), output(reference, arch), changed_from=output(base(arch), arch), **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_grafting_saves_peft_loads(arch: str, tmp_path) -> None:
    names = PEFT_FORWARD_TARGETS[arch]
    ours = get_peft_model(base(arch), OFTConfig(**_options(arch, 0, PEFT_FORWARD_TARGETS)))
    ours.add_adapter("other", OFTConfig(r=2, oft_block_size=0, target_modules=names[:1], coft=True, eps=0.5))
    randomize(ours, 2)  # the check runs "other" before saving: COFT projects its weights in place, the saved ones
    check_peft_loads_the_save(ours, lambda: base(arch), lambda model: output(model, arch), tmp_path, **TOL)


@pytest.mark.parametrize(("arch", "variant"), [("llama", 0), ("t5", 1), ("conv", 0)])
def test_training_gradients_equal_peft(arch: str, variant: int, tmp_path) -> None:
    theirs = _peft_model(arch, _options(arch, variant, PEFT_FORWARD_TARGETS), seed=3)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(base(arch), tmp_path, is_trainable=True).eval()
    loss(theirs, arch).backward()
    loss(ours, arch).backward()
    assert_same_gradients(oft_params(ours), oft_params(theirs))


def test_coft_projects_the_weights_as_peft_does(tmp_path) -> None:
    options = {**_options("llama", 0), "coft": True, "eps": 0.05}
    theirs = _peft_model("llama", options, seed=4)
    theirs.save_pretrained(tmp_path)  # unprojected weights: the first forward projects them
    ours = PeftModel.from_pretrained(base("llama"), tmp_path)
    expected = output(theirs, "llama")
    assert_close(output(ours, "llama"), expected, changed_from=output(base("llama"), "llama"), **TOL)
    projected = {n: p.detach() for n, p in oft_params(theirs).items()}
    for name, p in oft_params(ours).items():
        assert_close(p.detach(), projected[peft_key(name)], **TOL, msg=name)


def test_peft_oft_on_a_spatial_convolution_is_not_its_merge() -> None:
    """Why k×k convolutions are compared with PEFT's merge: PEFT 0.21's OFT forward folds the rotated
    patches back into the image, summing where they overlap, so even a fresh (identity) adapter changes
    the output. grafting computes the rotated-weight convolution that PEFT's merge writes. If this
    starts failing, PEFT fixed its forward and the k×k layers can join the forward comparison."""
    fresh = peft.get_peft_model(base("conv"), peft.OFTConfig(oft_block_size=3, target_modules=["spatial"]))
    plain = output(base("conv"), "conv")
    assert (output(fresh, "conv") - plain).abs().max() > 1e-3
    ours = get_peft_model(base("conv"), OFTConfig(oft_block_size=3, target_modules=["spatial"]))
    assert torch.equal(output(ours, "conv"), plain)
