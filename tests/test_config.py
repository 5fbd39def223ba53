"""Configs: validation, the adapter_config.json round trip, PEFT's files, unknown and inert keys."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

import grafting
from grafting import config_from_dict
from grafting.config.adapter_config import AdapterConfig
from grafting.errors import AdapterLoadError, ConfigError, GraftingWarning
from grafting_lora import LoraConfig
from tests.helpers import peft_lora_keys, read_json

LORA_FIELDS = [f.name for f in attrs.fields(LoraConfig) if f.name not in ("extra", *LoraConfig.absent_in_peft)]


# -- validation -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("r", 0),
        ("r", -3),
        ("r", 2.5),
        ("r", True),
        ("r", "4"),
        ("lora_alpha", 0),
        ("lora_alpha", -1.5),
        ("lora_dropout", 1.0),
        ("lora_dropout", -0.1),
        ("bias", "some"),
        ("init_lora_weights", "PiSSA"),
        ("init_lora_weights", "pissa_niter_"),
        ("init_lora_weights", "lora_ga"),
        ("init_lora_weights", "mica"),
        ("trainable_token_indices", [3, 3]),
        ("trainable_token_indices", {"embed_tokens": [-1]}),
        ("init_lora_weights", 1.5),
        ("rank_pattern", {"q_proj": 0}),
        ("alpha_pattern", {"q_proj": -2}),
        ("task_type", "TRANSLATION"),
        ("target_modules", 5),
        ("exclude_modules", 3.0),
        ("layers_to_transform", ["first"]),
        ("modules_to_save", "classifier"),
        ("layers_to_transform", {"target_modules": r".*\.q_proj", "layers_to_transform": [0]}),
        ("lora_bias", {"lora_bias": True, "use_dora": True}),
        ("lora_bias", {"lora_bias": True, "init_lora_weights": "gaussian"}),
    ],
)
def test_invalid_values_are_config_errors_naming_the_field(field: str, value: Any) -> None:
    """``value`` is the field's value, or (a combination PEFT refuses too) a dict of fields."""
    dict_fields = ("rank_pattern", "alpha_pattern", "trainable_token_indices")
    fields = value if isinstance(value, dict) and field not in dict_fields else {field: value}
    with pytest.raises(ConfigError, match=re.escape(field)):
        LoraConfig(**fields)
    # the same through adapter_config.json content
    with pytest.raises(ConfigError, match=re.escape(field)):
        LoraConfig.from_dict({"peft_type": "LORA", **fields})


@given(r=st.one_of(st.integers(max_value=0), st.floats(), st.booleans(), st.text(max_size=3), st.none()))
def test_ranks_must_be_positive_integers(r: Any) -> None:
    with pytest.raises(ConfigError, match=r"\br\b"):
        LoraConfig(r=r)


def test_layers_pattern_needs_layers_to_transform() -> None:
    with pytest.raises(ConfigError, match="layers_pattern"):
        LoraConfig(layers_pattern="layers")
    assert LoraConfig(layers_pattern="layers", layers_to_transform=1).layers_to_transform == [1]


def test_normalized_fields() -> None:
    config = LoraConfig(target_modules=("q_proj", "v_proj"), task_type=grafting.TaskType.SEQ_CLS)
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.task_type == "SEQ_CLS"
    assert LoraConfig(target_modules="all-linear").target_modules == "all-linear"


# -- JSON round trip -------------------------------------------------------------------------------------
names = st.lists(st.sampled_from(["q_proj", "v_proj", "dense", "c_attn", "wo", "query"]), min_size=1, unique=True)
patterns = st.dictionaries(st.sampled_from(["q_proj", "v_proj", r"layers\.0\..*"]), st.integers(1, 16), max_size=2)


@st.composite
def lora_config_dicts(draw: Any) -> dict[str, Any]:
    targets = draw(st.none() | names | st.sampled_from(["all-linear", r".*\.q_proj"]))
    layers = None if isinstance(targets, str) else draw(st.none() | st.lists(st.integers(0, 5), min_size=1, max_size=3))
    init = draw(st.sampled_from([True, False, "gaussian", "pissa", "pissa_niter_4", "olora", "orthogonal"]))
    use_dora = draw(st.booleans())
    return {
        "r": draw(st.integers(1, 64)),
        "lora_alpha": draw(st.integers(1, 64) | st.floats(0.5, 64)),
        "lora_dropout": draw(st.sampled_from([0.0, 0.05, 0.5])),
        "bias": draw(st.sampled_from(["none", "all", "lora_only"])),
        "use_rslora": draw(st.booleans()),
        "use_dora": use_dora,
        "init_lora_weights": init,
        "lora_bias": draw(st.booleans()) if init in (True, False) and not use_dora else False,
        "target_modules": targets,
        "exclude_modules": draw(st.none() | names),
        "layers_to_transform": layers,
        "layers_pattern": draw(st.none() | st.sampled_from(["layers", "h"])) if layers else None,
        "modules_to_save": draw(st.none() | st.just(["classifier"])),
        "rank_pattern": draw(patterns),
        "alpha_pattern": draw(patterns),
        "task_type": draw(st.none() | st.sampled_from([t.value for t in grafting.TaskType])),
        "inference_mode": draw(st.booleans()),
    }


@given(lora_config_dicts())
def test_json_round_trip(fields: dict[str, Any]) -> None:
    config = LoraConfig(**fields)
    data = json.loads(config.to_json_string())
    assert data["peft_type"] == "LORA"
    again = grafting.get_peft_config(data)
    assert type(again) is LoraConfig
    assert again == config
    assert again.to_dict() == config.to_dict()


def test_save_and_from_pretrained(tmp_path: Path) -> None:
    config = LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM", rank_pattern={"q_proj": 2})
    config.save_pretrained(tmp_path)
    assert os.listdir(tmp_path) == ["adapter_config.json"]
    assert AdapterConfig.from_pretrained(tmp_path) == config
    assert LoraConfig.from_pretrained(tmp_path) == config
    assert LoraConfig.from_pretrained(tmp_path, r=6).r == 6  # keyword overrides
    config.save_pretrained(tmp_path / "sub")
    assert AdapterConfig.from_pretrained(tmp_path, subfolder="sub") == config


def test_missing_or_broken_config_files(tmp_path: Path) -> None:
    with pytest.raises(AdapterLoadError, match=r"adapter_config\.json is missing"):
        AdapterConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterLoadError, match="not valid JSON"):
        AdapterConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"r": 8}')
    with pytest.raises(AdapterLoadError, match="no peft_type"):
        AdapterConfig.from_pretrained(tmp_path)


def test_get_peft_config_and_config_from_dict() -> None:
    config = grafting.get_peft_config({"peft_type": "LORA", "r": 3, "target_modules": ["q_proj"]})
    assert isinstance(config, LoraConfig)
    assert (config.r, config.target_modules) == (3, ["q_proj"])
    assert isinstance(config_from_dict({"peft_type": "lora"}), LoraConfig)  # the short name works too
    with pytest.raises(ConfigError, match="peft_type"):
        grafting.get_peft_config({"r": 3})
    with pytest.raises(ConfigError, match="peft_type"):
        LoraConfig.from_dict({"peft_type": "IA3"})


# -- PEFT's files ----------------------------------------------------------------------------------------------
def _peft_config(**kwargs: Any) -> Any:
    import peft

    return peft.LoraConfig(**kwargs)


PEFT_EXAMPLES: list[dict[str, Any]] = [
    {},
    {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"},
    {"r": 2, "use_dora": True, "use_rslora": True, "target_modules": "all-linear", "lora_dropout": 0.1},
    {"r": 8, "target_modules": ["query"], "modules_to_save": ["classifier"], "task_type": "SEQ_CLS", "bias": "all"},
    {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 4}, "target_modules": r".*\.(q|v)_proj"},
    {"target_modules": ["q"], "layers_to_transform": [0], "layers_pattern": "block", "exclude_modules": ["k"]},
    {"init_lora_weights": "gaussian", "target_modules": ["c_attn"], "fan_in_fan_out": True},
    {"init_lora_weights": False, "lora_bias": True, "target_modules": ["c_fc"], "exclude_modules": r".*\.h\.0\..*"},
]


@pytest.mark.parametrize("kwargs", PEFT_EXAMPLES)
def test_reads_peft_adapter_config(kwargs: dict[str, Any], tmp_path: Path) -> None:
    peft_config = _peft_config(**kwargs)
    peft_config.save_pretrained(tmp_path)
    written = read_json(tmp_path / "adapter_config.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error", GraftingWarning)
        config = AdapterConfig.from_pretrained(tmp_path)
    assert isinstance(config, LoraConfig)
    for field in LORA_FIELDS:
        value = written[field]
        expected = sorted(value) if isinstance(value, list) and field != "layers_to_transform" else value
        actual = getattr(config, field)
        actual = sorted(actual) if isinstance(actual, list) and field != "layers_to_transform" else actual
        assert actual == expected, field
    # what grafting writes back is what PEFT wrote (informational keys included)
    back = config.to_dict()
    for key, value in written.items():
        assert key in back, key
        assert back[key] == value or sorted(back[key]) == sorted(value), key


@given(lora_config_dicts())
def test_grafting_writes_only_keys_peft_knows(fields: dict[str, Any]) -> None:
    config = LoraConfig(**fields)
    assert set(config.to_dict()) <= peft_lora_keys()


@pytest.mark.parametrize("kwargs", PEFT_EXAMPLES)
def test_peft_reads_grafting_adapter_config_without_warnings(kwargs: dict[str, Any], tmp_path: Path) -> None:
    import peft

    config = LoraConfig(**kwargs)
    config.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftConfig.from_pretrained(str(tmp_path))
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "Unexpected keyword" in m], messages
    assert isinstance(loaded, peft.LoraConfig)
    for field in LORA_FIELDS:
        theirs = getattr(loaded, field)
        ours = config.to_dict()[field]
        if isinstance(theirs, set):
            theirs, ours = sorted(theirs), sorted(ours)
        assert theirs == ours, field


# -- unknown and inert keys ----------------------------------------------------------------------------------------
def test_unknown_keys_are_kept_written_back_and_warned(tmp_path: Path) -> None:
    data = {**LoraConfig(r=4).to_dict(), "future_option": {"level": 2}, "another_new_key": True}
    with pytest.warns(GraftingWarning, match=r"another_new_key.*future_option") as caught:
        config = config_from_dict(data)
    assert len([w for w in caught if issubclass(w.category, GraftingWarning)]) == 1
    assert config.extra == {"future_option": {"level": 2}, "another_new_key": True}
    assert config.to_dict()["future_option"] == {"level": 2}
    config.save_pretrained(tmp_path)
    assert read_json(tmp_path / "adapter_config.json")["another_new_key"] is True


def test_informational_keys_are_kept_silently() -> None:
    data = {**LoraConfig().to_dict(), "peft_version": "0.99.0", "auto_mapping": {"base_model_class": "X"}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", GraftingWarning)
        config = config_from_dict(data)
    assert config.to_dict()["peft_version"] == "0.99.0"
    assert config.to_dict()["auto_mapping"] == {"base_model_class": "X"}


@given(key=st.sampled_from(sorted(LoraConfig.inert_keys)), value=st.sampled_from([7, "on", [1, 2], {"bits": 4}, True]))
def test_inert_keys_with_non_default_values_are_config_errors(key: str, value: Any) -> None:
    if value == LoraConfig.inert_keys[key]:
        return
    with pytest.raises(ConfigError, match=re.escape(key)):
        LoraConfig.from_dict({"peft_type": "LORA", key: value})


def test_inert_keys_with_defaults_round_trip() -> None:
    data = LoraConfig().to_dict()
    assert {k: data[k] for k in LoraConfig.inert_keys} == LoraConfig.inert_keys
    with warnings.catch_warnings():
        warnings.simplefilter("error", GraftingWarning)
        assert LoraConfig.from_dict(data) == LoraConfig()
