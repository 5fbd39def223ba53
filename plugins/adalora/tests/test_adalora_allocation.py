"""PEFT is the oracle for training: the orthogonality term and its gradients equal PEFT's, and rank
allocation masks the same ranks from the same gradients, step by step, to the same saved files."""

from __future__ import annotations

import json

import pytest
from adalora_helpers import ARCHS, TOL, base, factors, inputs, pattern, peft_model, train
from safetensors.torch import load_file

from grafting import PeftModel
from grafting.testing import assert_close


@pytest.mark.parametrize("arch", ARCHS)
def test_adalora_orthogonality_term_equals_peft(arch: str, tmp_path) -> None:
    theirs = peft_model(arch, orth_reg_weight=0.7)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(base(arch), tmp_path, is_trainable=True)
    batch = inputs(arch)
    plain = base(arch)(**batch, labels=batch["input_ids"]).loss  # the model's own loss, without any adapter
    expected = theirs(**batch, labels=batch["input_ids"]).loss
    actual = ours(**batch, labels=batch["input_ids"]).loss
    assert_close(actual, expected, changed_from=plain, **TOL)
    with ours.disable_adapter():  # no active adapter, no term: the base model's own loss
        assert_close(ours(**batch, labels=batch["input_ids"]).loss, plain, changed_from=expected, **TOL)
    actual.backward()
    expected.backward()
    reference = factors(theirs)
    for name, p in factors(ours).items():
        assert_close(p.grad, reference[name].grad, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_adalora_allocation_masks_the_ranks_peft_masks(arch: str, tmp_path) -> None:
    """Same weights, same batches, same SGD steps: every step's E, the rank pattern and the final files agree."""
    theirs = peft_model(arch, 3)
    theirs.save_pretrained(tmp_path / "start")
    ours = PeftModel.from_pretrained(base(arch), tmp_path / "start", is_trainable=True)
    # transformers computes the cross entropy in float32 (logits.float()): float64 logits that differ in the
    # last bit may round apart there, so the trained factors agree to float32's precision, not float64's
    loose = {"rtol": 1e-5, "atol": 1e-6}
    patterns = []
    for step in range(9):  # tinit 1, budgeting to step 6 = total_step - tfinal, then the fixed pattern
        train(theirs, arch, range(step, step + 1))
        train(ours, arch, range(step, step + 1))
        mine, reference = factors(ours), factors(theirs)
        for name in mine:
            assert_close(mine[name], reference[name], **loose, msg=f"step {step}: {name}")
        zeros = {n: (p == 0).view(-1).tolist() for n, p in mine.items() if n.endswith("lora_E")}
        assert zeros == {n: (p == 0).view(-1).tolist() for n, p in reference.items() if n.endswith("lora_E")}
        assert pattern(ours) == pattern(theirs), f"step {step}"
        patterns.append(pattern(ours))
    final = patterns[-1]
    assert sum(map(sum, final.values())) == 2 * len(final)  # target_r per layer on average
    assert patterns[0] == {}  # nothing masked during tinit
    assert patterns[2] != final  # the budget then falls
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    saved = [json.loads((tmp_path / d / "adapter_config.json").read_text())["rank_pattern"] for d in ("ours", "theirs")]
    assert saved[0] == saved[1] == final
    tensors = [load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs")]
    assert {k: v.shape for k, v in tensors[0].items()} == {k: v.shape for k, v in tensors[1].items()}
    assert_close(tensors[0], tensors[1], **loose)


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_for_hot_swap_leaves_the_orthogonality_term_as_it_was(arch: str, tmp_path) -> None:
    """Growing the ranks with zeros (``prepare_model_for_compiled_hotswap``) changes neither the loss with its
    orthogonality term nor the factors' gradients: a padded rank is no rank of ``I``."""
    from grafting import prepare_model_for_compiled_hotswap

    peft_model(arch, orth_reg_weight=0.7).save_pretrained(tmp_path)
    plain = PeftModel.from_pretrained(base(arch), tmp_path, is_trainable=True)
    padded = PeftModel.from_pretrained(base(arch), tmp_path, is_trainable=True)
    prepare_model_for_compiled_hotswap(padded, target_rank=7)
    batch = inputs(arch)
    expected = plain(**batch, labels=batch["input_ids"]).loss
    with plain.disable_adapter():
        without_term = plain(**batch, labels=batch["input_ids"]).loss
    actual = padded(**batch, labels=batch["input_ids"]).loss
    assert_close(actual, expected, changed_from=without_term, **TOL)
    actual.backward()
    expected.backward()
    reference = factors(plain)
    for name, p in factors(padded).items():
        rank = reference[name].shape[0 if "lora_B" not in name else 1]
        assert p.shape != reference[name].shape, name  # grown
        live = p.grad[:rank] if "lora_B" not in name else p.grad[:, :rank]
        assert_close(live, reference[name].grad, rtol=1e-9, atol=1e-9, msg=name)
        assert not (p.grad[rank:] if "lora_B" not in name else p.grad[:, rank:]).any(), name  # zeros stay zeros
