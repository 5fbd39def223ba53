"""PEFT is the oracle: VeRA adapters saved by either library, with or without the projections, load in the other."""

from __future__ import annotations

import json

import peft
import pytest
from safetensors.torch import load_file

from grafting import PeftModel, VeraConfig, get_peft_model
from grafting.testing import assert_close, assert_identical, model_output, randomize_adapters, sample_inputs, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # fan_in_fan_out and PRNG notices, both libraries

ARCHS = ("llama", "gpt2", "bert", "t5")
#: Targets of several shapes, so the shared projections are sliced differently per layer.
TARGETS = {
    "llama": ["q_proj", "v_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_fc", "c_proj"],
    "bert": ["query", "value", "intermediate.dense"],
    "t5": ["q", "v", "wi", "wo"],
}


def _options(arch: str, save_projection: bool) -> dict:
    return {
        "r": 6,
        "target_modules": TARGETS[arch],
        "save_projection": save_projection,
        "projection_prng_key": 1234,
        "fan_in_fan_out": arch == "gpt2",
    }


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_peft_saves_grafting_loads_strictly(arch: str, save_projection: bool, tmp_path) -> None:
    inputs = sample_inputs(arch, seed=2)
    config = peft.VeraConfig(init_weights=False, **_options(arch, save_projection))
    theirs = peft.get_peft_model(tiny_model(arch, seed=2), config)
    theirs.eval()
    expected = model_output(theirs, inputs)
    base = model_output(tiny_model(arch, seed=2), inputs)
    theirs.save_pretrained(tmp_path)
    on_disk = load_file(tmp_path / "adapter_model.safetensors")
    assert ("base_model.vera_A" in on_disk) is save_projection

    ours = PeftModel.from_pretrained(tiny_model(arch, seed=2), tmp_path)  # strict by default
    assert_close(model_output(ours, inputs), expected, changed_from=base)
    shared = ours.base_model.shared_states["default"]
    assert_identical(shared.vera_A, theirs.base_model.vera_A["default"])  # read or drawn again: the same bits
    assert_identical(shared.vera_B, theirs.base_model.vera_B["default"])
    merged, reference = ours.merge_and_unload().state_dict(), theirs.merge_and_unload().state_dict()
    assert sorted(merged) == sorted(reference)
    for name, tensor in reference.items():
        assert_close(merged[name], tensor, msg=name)


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_grafting_saves_peft_loads(arch: str, save_projection: bool, tmp_path) -> None:
    inputs = sample_inputs(arch, seed=3)
    ours = get_peft_model(tiny_model(arch, seed=3), VeraConfig(**_options(arch, save_projection)))
    randomize_adapters(ours, seed=3, scale=1.0)
    ours.eval()
    expected = model_output(ours, inputs)
    base = model_output(tiny_model(arch, seed=3), inputs)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "VERA"
    assert "exclude_modules" not in saved  # PEFT's VeraConfig has no such field

    theirs = peft.PeftModel.from_pretrained(tiny_model(arch, seed=3), tmp_path)
    theirs.eval()
    assert_close(model_output(theirs, inputs), expected, changed_from=base)
    ours_keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    theirs.save_pretrained(tmp_path / "again")
    assert set(load_file(tmp_path / "again" / "adapter_model.safetensors")) == ours_keys


@pytest.mark.parametrize(("key", "r", "arch"), [(0, 256, "llama"), (7, 3, "gpt2"), (2**40, 5, "t5")])
def test_the_projections_are_peft_s_for_any_key_and_shapes(key: int, r: int, arch: str) -> None:
    options = {"r": r, "projection_prng_key": key, "target_modules": TARGETS[arch]}
    theirs = peft.get_peft_model(tiny_model(arch), peft.VeraConfig(**options))
    ours = get_peft_model(tiny_model(arch), VeraConfig(**options))
    shared = ours.base_model.shared_states["default"]
    assert_identical(shared.vera_A, theirs.base_model.vera_A["default"])
    assert_identical(shared.vera_B, theirs.base_model.vera_B["default"])


def test_a_fresh_adapter_starts_as_peft_s() -> None:
    """init_weights=True: λ_b = 0 and λ_d = d_initial, as PEFT starts; the model computes as its base."""
    options = {"r": 4, "d_initial": 0.3, "target_modules": ["q_proj"]}
    ours = get_peft_model(tiny_model("llama"), VeraConfig(**options))
    theirs = peft.get_peft_model(tiny_model("llama"), peft.VeraConfig(**options))
    ours_state = sorted(v.tolist() for k, v in ours.state_dict().items() if "vera_lambda" in k)
    theirs_state = sorted(v.tolist() for k, v in theirs.state_dict().items() if "vera_lambda" in k)
    assert ours_state == theirs_state
    inputs = sample_inputs("llama")
    assert_close(model_output(ours, inputs), model_output(tiny_model("llama"), inputs))
