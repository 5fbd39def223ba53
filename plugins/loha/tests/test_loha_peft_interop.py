"""PEFT is the oracle: LoHa adapters saved by either library load in the other with the same outputs,
the same merged weights and, in training, the same gradients and the same dropout draws."""

from __future__ import annotations

from typing import Any

import peft
import pytest
import torch
from loha_helpers import base, hada_params, output, randomize, targets, train_output, weights_of

from grafting import PeftModel, get_peft_model
from grafting.testing import assert_close, assert_same_gradients, check_peft_loads_the_save
from grafting_loha import LoHaAdapter, LoHaConfig

TOL = {"rtol": 1e-10, "atol": 1e-10}  # float64 against float64: far below any wrong delta
CASES = [("llama", False), ("bert", False), ("conv", False), ("conv", True)]


def _options(arch: str, effective: bool) -> dict[str, Any]:
    names = targets(arch)
    return {  # alpha/r exact in float32: PEFT multiplies by torch.tensor(alpha / r), a float32 scalar
        "r": 3,
        "alpha": 6,
        "target_modules": names,
        "rank_pattern": {names[0]: 2},
        "alpha_pattern": {names[-1]: 1.5},
        "use_effective_conv2d": effective,
        "init_weights": False,
    }


def _peft_key(name: str) -> str:
    """grafting's ``...layer.adapters.<adapter>.hada_x`` as PEFT names it: ``...layer.hada_x.<adapter>``."""
    path, _, rest = name.partition(".adapters.")
    adapter, _, local = rest.partition(".")
    return f"{path}.{local}.{adapter}"


def _assert_same_merge(ours: Any, theirs: Any) -> None:
    mine, reference = weights_of(ours.merge_and_unload()), weights_of(theirs.merge_and_unload())
    assert_close(mine, reference, **TOL, msg="merged weights")


@pytest.mark.parametrize(("arch", "effective"), CASES)
def test_peft_saves_grafting_loads(arch: str, effective: bool, tmp_path) -> None:
    theirs = peft.get_peft_model(base(arch), peft.LoHaConfig(**_options(arch, effective)))
    randomize(theirs, 1)
    theirs.eval()
    expected = output(theirs, arch)
    plain = output(base(arch), arch)
    theirs.save_pretrained(tmp_path)

    ours = PeftModel.from_pretrained(base(arch), tmp_path)
    assert {_peft_key(n) for n in hada_params(ours)} == set(hada_params(theirs))
    for path in ("dense", "factored", "auto"):
        for adapter in (m for m in ours.modules() if isinstance(m, LoHaAdapter)):
            adapter.path = path
        assert_close(output(ours, arch), expected, changed_from=plain, **TOL, msg=f"{path} path")
    _assert_same_merge(ours, theirs)


@pytest.mark.parametrize(("arch", "effective"), CASES)
def test_grafting_saves_peft_loads(arch: str, effective: bool, tmp_path) -> None:
    ours = get_peft_model(base(arch), LoHaConfig(**_options(arch, effective)))
    ours.add_adapter("other", LoHaConfig(r=2, target_modules=targets(arch)[1:], init_weights=False))
    randomize(ours, 2)
    check_peft_loads_the_save(ours, lambda: base(arch), lambda model: output(model, arch), tmp_path, **TOL)


def _cp_weight_by_autograd(t1, w1a, w1b, t2, w2a, w2b, scale):  # type: ignore[no-untyped-def]
    """PEFT's effective-conv ΔW, differentiated by autograd (PEFT 0.21's hand-written backward
    gets the hada_w1_a/hada_w2_a gradients wrong; see the test below)."""
    first = torch.einsum("ijkl,jr,ip->prkl", t1, w1b, w1a)
    second = torch.einsum("ijkl,jr,ip->prkl", t2, w2b, w2a)
    return first * second * scale


@pytest.mark.parametrize(("arch", "effective"), CASES)
@pytest.mark.parametrize("path", ["dense", "factored"])
def test_training_gradients_equal_peft(arch: str, effective: bool, path: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(peft.tuners.loha.layer, "make_weight_cp", _cp_weight_by_autograd)
    theirs = peft.get_peft_model(base(arch), peft.LoHaConfig(**_options(arch, effective)))
    randomize(theirs, 3)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(base(arch), tmp_path, is_trainable=True)
    for adapter in (m for m in ours.modules() if isinstance(m, LoHaAdapter)):
        adapter.path = path
    theirs.eval()  # the model's own dropout off: PEFT draws for module dropout even when it is 0
    ours.eval()
    train_output(theirs, arch).backward()
    train_output(ours, arch).backward()
    assert_same_gradients(hada_params(ours), hada_params(theirs))


def test_rank_and_module_dropout_draw_as_peft_does(tmp_path) -> None:
    options = {**_options("llama", False), "rank_dropout": 0.4, "module_dropout": 0.3}
    theirs = peft.get_peft_model(base("llama"), peft.LoHaConfig(**options))
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


def test_peft_effective_conv_backward_disagrees_with_its_forward() -> None:
    """Why the gradient test differentiates PEFT's effective-conv ΔW by autograd: PEFT's own
    backward for hada_w1_a/hada_w2_a is not the derivative of its forward. If this starts
    failing, PEFT fixed it and the monkeypatch above can go."""
    from peft.tuners.loha.layer import make_weight_cp

    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 3, 3, 3), (3, 5), (3, 4)] * 2
    factors = [torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes]
    grad = torch.randn(5, 4, 3, 3, generator=gen, dtype=torch.float64)
    scale = torch.tensor(0.5, dtype=torch.float64)
    theirs = torch.autograd.grad(make_weight_cp(*factors, scale), factors, grad)
    truth = torch.autograd.grad(_cp_weight_by_autograd(*factors, scale), factors, grad)
    wrong = [not torch.allclose(a, b) for a, b in zip(theirs, truth)]
    assert wrong == [False, True, False, False, True, False]  # t1, w1a, w1b, t2, w2a, w2b
