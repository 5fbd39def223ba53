"""IA3Config: validation, defaults by model type, and the adapter_config.json round trip."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
from peft.utils import constants
from torch import nn

import grafting
from grafting import AdapterConfig, ConfigError, GraftingWarning, IA3Config, get_peft_config, get_peft_model
from grafting.testing import tiny_model
from grafting_ia3.config import is_feedforward
from grafting_ia3.defaults import DEFAULTS


def test_lazy_config_name_resolves_to_the_plugin_class() -> None:
    assert grafting.IA3Config is IA3Config
    assert type(get_peft_config({"peft_type": "IA3", "target_modules": ["q"], "feedforward_modules": []})) is IA3Config


def test_feedforward_modules_must_be_a_subset_of_target_modules() -> None:
    with pytest.raises(ConfigError, match=r"feedforward_modules must be a subset of target_modules: \['fc2'\]"):
        IA3Config(target_modules=["q_proj", "v_proj"], feedforward_modules=["v_proj", "fc2"])
    IA3Config(target_modules=["q_proj", "fc2"], feedforward_modules={"fc2"})  # a set is fine, as in PEFT


def test_feedforward_modules_outside_the_default_targets_are_refused() -> None:
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="default target_modules of model type 'llama'"):
        get_peft_model(model, IA3Config(feedforward_modules=["up_proj"]))
    assert not any("adapters" in name for name, _ in model.named_modules())


def test_unknown_model_type_needs_explicit_feedforward_modules() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ConfigError, match=r"feedforward_modules not set .* set feedforward_modules"):
        get_peft_model(model, IA3Config(target_modules=["0"]))
    with pytest.raises(ConfigError, match="target_modules and feedforward_modules not set"):
        get_peft_model(model, IA3Config())
    get_peft_model(model, IA3Config(target_modules=["0"], feedforward_modules=[]))


@pytest.mark.parametrize(
    ("field", "value"),
    [("init_ia3_weights", "yes"), ("fan_in_fan_out", 1), ("feedforward_modules", [1]), ("feedforward_modules", 3)],
)
def test_field_types_are_validated(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        IA3Config(**{field: value})
    with pytest.raises(ConfigError, match=field):
        IA3Config.from_dict({"peft_type": "IA3", field: value})


def test_defaults_are_peft_defaults() -> None:
    """Both libraries resolve a saved ``target_modules: null`` again, so the tables must agree."""
    peft_targets = constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
    peft_feedforward = constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING
    assert set(DEFAULTS) == set(peft_targets)
    for kind, defaults in DEFAULTS.items():
        assert set(defaults.targets) == set(peft_targets[kind]), kind
        assert set(defaults.feedforward) == set(peft_feedforward[kind]), kind


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5"])
def test_default_targets_and_sides_match_peft_on_real_models(arch: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = get_peft_model(tiny_model(arch), IA3Config())
        theirs = peft.get_peft_model(tiny_model(arch), peft.IA3Config())
    shapes = {k: tuple(v.shape) for k, v in grafting.get_peft_model_state_dict(ours).items()}
    reference = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(theirs).items()}
    assert shapes == reference
    assert any(s[0] == 1 for s in shapes.values())  # input scaling
    assert any(s[1] == 1 for s in shapes.values())  # output scaling


def test_feedforward_list_entries_match_as_plain_suffixes_like_peft() -> None:
    assert is_feedforward("decoder.block.0.layer.2.DenseReluDense.wo", ["o"])
    assert not is_feedforward("decoder.block.0.layer.0.SelfAttention.q", ["o"])
    assert is_feedforward("h.0.mlp.c_proj", r".*mlp\.c_proj")
    assert not is_feedforward("h.0.mlp.c_proj.x", r".*mlp\.c_proj")


def test_json_round_trip_and_keys_peft_writes(tmp_path) -> None:
    config = IA3Config(
        target_modules=["k_proj", "down_proj"],
        feedforward_modules=["down_proj"],
        init_ia3_weights=False,
        modules_to_save=["lm_head"],
        exclude_modules=["layers.1.mlp.down_proj"],
    )
    data = config.to_dict()
    assert IA3Config.from_dict(data) == config
    peft_keys = set(peft.IA3Config(target_modules=["k_proj"], feedforward_modules=[]).to_dict())
    assert set(data) <= peft_keys  # nothing PEFT's IA3Config would warn about
    with_layers = IA3Config(target_modules=["k_proj"], feedforward_modules=[], layers_to_transform=[0])
    assert with_layers.to_dict()["layers_to_transform"] == [0]
    assert IA3Config.from_dict(with_layers.to_dict()) == with_layers
    config.save_pretrained(tmp_path)
    assert AdapterConfig.from_pretrained(tmp_path) == config


def test_a_config_peft_saved_loads_without_warnings(tmp_path) -> None:
    peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
    ).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GraftingWarning)
        config = AdapterConfig.from_pretrained(tmp_path)
    assert isinstance(config, IA3Config)
    assert sorted(config.target_modules) == ["down_proj", "k_proj", "v_proj"]
    assert config.feedforward_modules == ["down_proj"]
    assert config.init_ia3_weights is False
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(config.to_dict()) == set(saved)


def test_unknown_keys_are_kept_with_a_warning() -> None:
    with pytest.warns(GraftingWarning, match="future_option"):
        config = IA3Config.from_dict({"peft_type": "IA3", "future_option": 3})
    assert config.to_dict()["future_option"] == 3
