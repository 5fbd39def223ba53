"""grafting.testing's numerics policy: assert_identical is bitwise, assert_close tolerates rounding only."""

from __future__ import annotations

import pytest
import torch

import grafting
from grafting.testing import (
    MARGIN,
    TOLERANCES,
    assert_close,
    assert_identical,
    margin,
    model_output,
    sample_inputs,
    tiny_model,
    tolerance,
)
from tests.toy_methods import ToyDeltaConfig


def _rounded_differently(x: torch.Tensor) -> torch.Tensor:
    """``x`` off by about one ulp per element, as another kernel's summation order would give."""
    return x + x.abs() * torch.finfo(x.dtype).eps


# -- assert_identical ----------------------------------------------------------------------------------
def test_identical_accepts_a_copy_and_nested_states() -> None:
    x = torch.randn(3, 4)
    assert_identical(x.clone(), x)
    assert_identical({"a": x.clone(), "b": (x[0].clone(), 3)}, {"b": (x[0], 3), "a": x})


@pytest.mark.parametrize(
    ("actual", "message"),
    [
        (lambda x: _rounded_differently(x), "elements differ"),
        (lambda x: x.double(), "torch.float64"),
        (lambda x: x.reshape(4, 3), "[4, 3]"),
        (lambda x: torch.where(x == x.flatten()[0], -0.0 * x, x), "differ"),
    ],
)
def test_identical_refuses_one_ulp_another_dtype_or_shape(actual, message: str) -> None:
    x = torch.randn(3, 4)
    x.view(-1)[0] = 0.0
    with pytest.raises(AssertionError, match=message.replace("[", r"\[").replace(".", r"\.")):
        assert_identical(actual(x), x, msg="weights")


def test_identical_names_the_key_and_refuses_missing_keys() -> None:
    state = {"a": torch.zeros(2), "b": torch.ones(2)}
    with pytest.raises(AssertionError, match=r"\['b'\]"):
        assert_identical({"a": torch.zeros(2), "b": torch.full((2,), 2.0)}, state)
    with pytest.raises(AssertionError, match="structures differ"):
        assert_identical({"a": torch.zeros(2)}, state)


def test_identical_treats_nan_bits_as_data() -> None:
    x = torch.tensor([1.0, float("nan")])
    assert_identical(x.clone(), x)


# -- assert_close ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_close_accepts_last_bit_differences_in_every_dtype(dtype: torch.dtype) -> None:
    x = (torch.randn(4, 8) * 3).to(dtype)
    assert_close(_rounded_differently(x), x)


def test_close_tolerance_follows_the_dtype_and_the_magnitude() -> None:
    assert tolerance(torch.ones(2)) == (1.3e-6, 1e-5)
    assert tolerance(torch.ones(2, dtype=torch.float64)) == (1e-7, 1e-7)
    assert tolerance(torch.tensor([0.5, -200.0])) == (1.3e-6, pytest.approx(2e-3))
    assert tolerance(torch.tensor([1e-3, 0.0])) == (1.3e-6, pytest.approx(1e-8))
    assert tolerance(torch.zeros(2)) == (1.3e-6, 1e-5)
    assert tolerance(torch.tensor([1, 2])) == (0.0, 0.0)
    # a near-zero entry next to large ones gets their absolute slack: cancellation error is absolute
    big = torch.tensor([1000.0, 1e-4])
    assert_close(big + torch.tensor([0.0, 5e-4]), big)
    # ... and gradients of scale 1e-3 are not compared with an absolute slack of 1e-5
    small = torch.tensor([1e-3, -2e-4])
    with pytest.raises(AssertionError):
        assert_close(small * 1.01, small)


def test_close_refuses_a_wrong_result() -> None:
    x = torch.randn(4, 8)
    with pytest.raises(AssertionError, match="logits"):
        assert_close(x * 1.001, x, msg="logits")
    with pytest.raises(AssertionError, match="float64"):
        assert_close(x.double(), x)
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([1, 2]), torch.tensor([1, 3]))


def test_close_compares_nested_outputs() -> None:
    model = tiny_model("llama")
    inputs = sample_inputs("llama")
    with torch.no_grad():
        first, second = (
            model(**inputs, labels=inputs["input_ids"], use_cache=False),
            model(**inputs, labels=inputs["input_ids"], use_cache=False),
        )
    assert_close(second, first)
    with pytest.raises(AssertionError, match="loss"):
        assert_close({**second, "loss": second.loss + 1e-3}, first)


@pytest.mark.usefixtures("toy_methods")
def test_close_with_changed_from_fails_when_the_adapter_has_no_effect() -> None:
    base = tiny_model("llama")
    inputs = sample_inputs("llama")
    expected_base = model_output(base, inputs)
    model = grafting.get_peft_model(tiny_model("llama"), ToyDeltaConfig(target_modules=["q_proj", "v_proj"], scale=0.0))
    # an adapter of zeros (D = 0) is a no-op: its output equals the base, so it proves nothing
    with pytest.raises(AssertionError, match="no-op"):
        assert_close(model_output(model, inputs), model_output(model, inputs), changed_from=expected_base)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "toy_d" in name:
                p.normal_(0, 0.5)
    adapted = model_output(model, inputs)
    assert_close(_rounded_differently(adapted), adapted, changed_from=expected_base)
    with pytest.raises(AssertionError):  # the base output where the adapted one was expected
        assert_close(expected_base, adapted, changed_from=expected_base)


def test_close_with_changed_from_needs_a_margin_not_just_a_difference() -> None:
    x = torch.randn(4, 8)
    rtol, atol = tolerance(x)
    barely = x - (atol + rtol * x.abs()) * (MARGIN / 2)  # moved, but a 1% error of the move would pass
    with pytest.raises(AssertionError, match="tolerances away"):
        assert_close(x, x, changed_from=barely)
    assert_close(x, x, changed_from=x - (atol + rtol * x.abs()) * (MARGIN * 2))


def test_close_asks_coarse_dtypes_for_the_margin_they_can_show() -> None:
    assert margin(TOLERANCES[torch.float32][0]) == MARGIN
    assert margin(TOLERANCES[torch.bfloat16][0]) == pytest.approx(31.25)
    x = torch.randn(4, 8).to(torch.bfloat16)
    rtol, atol = tolerance(x)
    moved = (x.float() + (atol + rtol * x.float().abs()) * 40).to(torch.bfloat16)  # 40 tolerances: enough here
    assert_close(x, x, changed_from=moved)
    with pytest.raises(AssertionError, match="tolerances away"):
        assert_close(x, x, changed_from=(x.float() + (atol + rtol * x.float().abs()) * 20).to(torch.bfloat16))
