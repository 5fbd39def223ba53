"""PEFT is the oracle: IA3 adapters saved by either library load in the other with the same logits."""

from __future__ import annotations

import peft
import pytest
import torch
from ia3_helpers import ia3_parameters, randomize

from grafting import IA3Config, PeftModel, get_peft_model
from grafting.testing import assert_close, model_output, sample_inputs, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # fan_in_fan_out notices on GPT-2, both libraries

ARCHS = ("llama", "gpt2", "t5", "bert")
#: Non-default targets per architecture: (target_modules, feedforward_modules).
EXPLICIT = {
    "llama": (["q_proj", "o_proj", "up_proj", "down_proj"], ["o_proj", "down_proj"]),
    "gpt2": (["c_attn", "c_fc", "c_proj"], ["c_proj"]),
    "t5": (["q", "o", "wi", "wo"], ["o"]),  # PEFT's plain-suffix rule makes "wo" feed-forward too
    "bert": (r".*\.(query|intermediate\.dense|output\.dense)", r".*\.output\.dense"),
}


def targets(arch: str, explicit: bool) -> dict:
    if not explicit:
        return {}
    target_modules, feedforward_modules = EXPLICIT[arch]
    return {"target_modules": target_modules, "feedforward_modules": feedforward_modules}


def merged_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_peft_saves_grafting_loads(arch: str, explicit: bool, tmp_path) -> None:
    inputs = sample_inputs(arch, seed=1)
    theirs = peft.get_peft_model(
        tiny_model(arch, seed=1), peft.IA3Config(init_ia3_weights=False, **targets(arch, explicit))
    )
    theirs.eval()
    expected = model_output(theirs, inputs)
    base = model_output(tiny_model(arch, seed=1), inputs)
    theirs.save_pretrained(tmp_path)

    ours = PeftModel.from_pretrained(tiny_model(arch, seed=1), tmp_path)
    assert_close(model_output(ours, inputs), expected, changed_from=base, msg="PEFT's adapter in grafting")
    # the merged weights agree too: rows, columns and biases are scaled alike
    reference = merged_state(theirs.merge_and_unload())
    merged = merged_state(ours.merge_and_unload())
    assert_close(merged, reference, msg="merged weights")


@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_grafting_saves_peft_loads(arch: str, explicit: bool, tmp_path) -> None:
    inputs = sample_inputs(arch, seed=2)
    ours = get_peft_model(tiny_model(arch, seed=2), IA3Config(**targets(arch, explicit)))
    randomize(ours, 2)
    ours.add_adapter("other", IA3Config(init_ia3_weights=False, **targets(arch, explicit)))
    expected = model_output(ours, inputs)
    ours.set_adapter("other")
    expected_other = model_output(ours, inputs)
    ours.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(tiny_model(arch, seed=2), tmp_path)
    base = model_output(tiny_model(arch, seed=2), inputs)
    assert_close(model_output(theirs, inputs), expected, changed_from=base, msg="grafting's adapter in PEFT")
    theirs.load_adapter(tmp_path / "other", adapter_name="other")
    theirs.set_adapter("other")
    assert_close(model_output(theirs, inputs), expected_other, changed_from=expected, msg="the other adapter")


def test_both_libraries_put_ia3_l_on_the_same_layers_with_the_same_sides(tmp_path) -> None:
    """A T5 config whose feed-forward entry is also a plain suffix of another target."""
    config = {"target_modules": ["o", "wo", "k"], "feedforward_modules": ["o"]}
    ours = get_peft_model(tiny_model("t5"), IA3Config(**config))
    theirs = peft.get_peft_model(tiny_model("t5"), peft.IA3Config(**config))
    shapes = {k.replace(".adapters.default", ""): tuple(v.shape) for k, v in ia3_parameters(ours).items()}
    reference = {k.replace(".default", ""): tuple(v.shape) for k, v in theirs.named_parameters() if "ia3_l" in k}
    assert shapes == reference
