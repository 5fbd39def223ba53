"""PEFT is the oracle: LoKr adapters saved by either library load in the other with the same outputs,
the same merged weights and, in training, the same gradients and the same dropout draws."""

from __future__ import annotations

from typing import Any

import peft
import pytest
from lokr_helpers import TARGETS, TOL, base, lokr_params, output, peft_key, randomize, train_output, weights_of

from grafting import PeftModel, get_peft_model
from grafting.testing import assert_close, assert_same_gradients, check_peft_loads_the_save
from grafting_lokr import LoKrConfig, LoKrLinear

CONV2D = ["conv_a", "conv_b", "grouped", "conv_c"]
#: (arch, options): each storage of W1 and W2 PEFT has, on every architecture
CASES = [
    ("llama", {"r": 2}),
    ("llama", {"r": 1, "decompose_both": True, "decompose_factor": 2}),
    ("llama", {"r": 2, "layers_to_transform": [1], "exclude_modules": ["down_proj"], "modules_to_save": ["lm_head"]}),
    ("bert", {"r": 4}),
    ("t5", {"r": 1, "decompose_both": True}),
    ("gpt2", {"r": 2}),
    ("conv", {"r": 1}),
    # PEFT 0.21 fails on an effective Conv1d with a 3-wide kernel (test_lokr_layers covers grafting's)
    ("conv", {"r": 1, "use_effective_conv2d": True, "decompose_both": True, "target_modules": [*CONV2D, "seq_pw"]}),
    ("conv", {"r": 3}),
]
IDS = [f"{arch}-{'-'.join(f'{k}={v}' for k, v in opts.items() if k != 'target_modules')}" for arch, opts in CASES]


def _options(arch: str, extra: dict[str, Any]) -> dict[str, Any]:
    names = extra.get("target_modules", TARGETS[arch])
    pattern = {"rank_pattern": {names[0]: 3}, "alpha_pattern": {names[-1]: 1.5}} if len(names) > 1 else {}
    return {"alpha": 6, "target_modules": names, "init_weights": False, **pattern, **extra}


def _assert_same_merge(ours: Any, theirs: Any) -> None:
    mine, reference = weights_of(ours.merge_and_unload()), weights_of(theirs.merge_and_unload())
    assert_close(mine, reference, **TOL, msg="merged weights")


@pytest.mark.parametrize(("arch", "extra"), CASES, ids=IDS)
def test_peft_saves_grafting_loads(arch: str, extra: dict[str, Any], tmp_path) -> None:
    theirs = peft.get_peft_model(base(arch), peft.LoKrConfig(**_options(arch, extra)))
    randomize(theirs, 1)
    theirs.eval()
    expected = output(theirs, arch)
    theirs.save_pretrained(tmp_path)

    ours = PeftModel.from_pretrained(base(arch), tmp_path)
    assert {peft_key(n) for n in lokr_params(ours)} == set(lokr_params(theirs))
    plain = output(base(arch), arch)
    for factored in (True, False):
        for adapter in (m for m in ours.modules() if isinstance(m, LoKrLinear)):
            adapter.factored = factored
        assert_close(output(ours, arch), expected, changed_from=plain, **TOL, msg=f"factored={factored}")
    _assert_same_merge(ours, theirs)


@pytest.mark.parametrize(("arch", "extra"), CASES, ids=IDS)
def test_grafting_saves_peft_loads(arch: str, extra: dict[str, Any], tmp_path) -> None:
    ours = get_peft_model(base(arch), LoKrConfig(**_options(arch, extra)))
    ours.add_adapter("other", LoKrConfig(r=2, alpha=3, target_modules=TARGETS[arch][-1:], init_weights=False))
    randomize(ours, 2)
    check_peft_loads_the_save(ours, lambda: base(arch), lambda model: output(model, arch), tmp_path, **TOL)


@pytest.mark.parametrize(("arch", "extra"), [c for c in CASES if c[0] in ("llama", "conv")])
@pytest.mark.parametrize("factored", [True, False])
def test_training_gradients_equal_peft(arch: str, extra: dict[str, Any], factored: bool, tmp_path) -> None:
    theirs = peft.get_peft_model(base(arch), peft.LoKrConfig(**_options(arch, extra)))
    randomize(theirs, 3)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(base(arch), tmp_path, is_trainable=True)
    for adapter in (m for m in ours.modules() if isinstance(m, LoKrLinear)):
        adapter.factored = factored
    theirs.eval()  # the model's own dropout off: PEFT draws for module dropout even when it is 0
    ours.eval()
    train_output(theirs, arch).backward()
    train_output(ours, arch).backward()
    assert_same_gradients(lokr_params(ours), lokr_params(theirs))


@pytest.mark.parametrize("rank_dropout_scale", [False, True])
def test_rank_and_module_dropout_draw_as_peft_does(rank_dropout_scale: bool, tmp_path) -> None:
    import torch

    options = {
        **_options("llama", {"r": 2}),
        "rank_dropout": 0.4,
        "module_dropout": 0.3,
        "rank_dropout_scale": rank_dropout_scale,
    }
    theirs = peft.get_peft_model(base("llama"), peft.LoKrConfig(**options))
    randomize(theirs, 4)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(base("llama"), tmp_path, is_trainable=True)
    with torch.no_grad():
        without_dropout = train_output(ours.eval(), "llama")
    theirs.train()
    ours.train()
    for seed in range(3):
        torch.manual_seed(seed)
        expected = train_output(theirs, "llama")
        torch.manual_seed(seed)
        actual = train_output(ours, "llama")
        assert_close(actual, expected, changed_from=without_dropout, **TOL, msg=f"dropout draw {seed}")
