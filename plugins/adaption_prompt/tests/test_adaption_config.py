"""AdaptionPromptConfig: validation, and adapter_config.json as PEFT writes and reads it."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
from hypothesis import given
from hypothesis import strategies as st

from grafting import AdaptionPromptConfig, ConfigError, get_peft_config, get_peft_model
from grafting.testing import tiny_model


def peft_dict(**options) -> dict:
    """adapter_config.json content as PEFT writes it."""
    return json.loads(json.dumps(peft.AdaptionPromptConfig(**options).to_dict()))


def test_peft_config_reads_and_writes_back_unchanged() -> None:
    data = peft_dict(adapter_len=4, adapter_layers=2, target_modules="self_attn", task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unknown-key warning
        config = get_peft_config(data)
    assert isinstance(config, AdaptionPromptConfig)
    assert (config.adapter_len, config.adapter_layers, config.target_modules) == (4, 2, ["self_attn"])
    assert config.to_dict() == data


@given(
    adapter_len=st.integers(1, 64),
    adapter_layers=st.integers(1, 64),
    target=st.sampled_from([None, "self_attn", "attn"]),
    inference_mode=st.booleans(),
)
def test_grafting_config_round_trips_and_peft_reads_it(adapter_len, adapter_layers, target, inference_mode) -> None:
    config = AdaptionPromptConfig(
        adapter_len=adapter_len, adapter_layers=adapter_layers, target_modules=target, inference_mode=inference_mode
    )
    data = config.to_dict()
    assert data["target_modules"] == target
    assert AdaptionPromptConfig.from_dict(data) == config
    theirs = peft.get_peft_config(data)  # no unknown keys: PEFT warns about none and reads every value
    assert (theirs.adapter_len, theirs.adapter_layers, theirs.target_modules) == (adapter_len, adapter_layers, target)
    assert set(data) <= set(peft_dict()) | {"peft_version", "auto_mapping"}


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"adapter_len": 0, "adapter_layers": 1}, "adapter_len"),
        ({"adapter_len": 2.5, "adapter_layers": 1}, "adapter_len"),
        ({"adapter_len": 2, "adapter_layers": True}, "adapter_layers"),
        ({"adapter_len": 2, "adapter_layers": 1, "target_modules": ["q_proj", "v_proj"]}, "target_modules"),
        ({"adapter_len": 2, "adapter_layers": 1, "target_modules": 3}, "target_modules"),
        ({"adapter_len": 2, "adapter_layers": 1, "exclude_modules": ["x"]}, "exclude_modules"),
        ({"adapter_len": 2, "adapter_layers": 1, "layers_to_transform": [0]}, "layers_to_transform"),
    ],
)
def test_invalid_options_name_the_field(options: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        AdaptionPromptConfig(**options)


@pytest.mark.parametrize(
    ("options", "missing"),
    [({"adapter_len": 2}, "adapter_layers"), ({"adapter_layers": 1}, "adapter_len"), ({}, "adapter_len and")],
)
def test_configs_build_without_lengths_and_refuse_when_added(options: dict, missing: str) -> None:
    config = AdaptionPromptConfig(**options)  # PEFT builds it too, and checks when the config is used
    assert peft.AdaptionPromptConfig(**options).adapter_len == options.get("adapter_len")
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match=missing):
        get_peft_model(model, config)
    assert not any(".adapters." in n for n, _ in model.named_parameters())


def test_a_file_with_a_bad_value_is_a_config_error_naming_the_file() -> None:
    with pytest.raises(ConfigError, match=r"here\.json.*adapter_layers"):
        AdaptionPromptConfig.from_dict(
            {"peft_type": "ADAPTION_PROMPT", "adapter_len": 2, "adapter_layers": -1}, source="here.json"
        )
