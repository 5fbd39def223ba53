"""LoHaConfig: validation, per-module rank and alpha, and adapter_config.json as PEFT writes it."""

from __future__ import annotations

import json
import warnings
from typing import Any

import peft
import pytest

import grafting
from grafting.errors import ConfigError
from grafting_loha import LoHaConfig


def test_grafting_resolves_the_config_class_and_the_method() -> None:
    assert grafting.LoHaConfig is LoHaConfig
    method = grafting.get_method("LOHA")
    assert method.config_class is LoHaConfig
    assert method.name == "loha"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("r", 0),
        ("r", 2.5),
        ("r", True),
        ("alpha", 0),
        ("rank_dropout", 1.0),
        ("module_dropout", -0.1),
        ("init_weights", "gaussian"),
        ("use_effective_conv2d", "yes"),
        ("rank_pattern", {"q_proj": 0}),
        ("rank_pattern", {"q_proj": 2.0}),
        ("alpha_pattern", {"q_proj": "big"}),
    ],
)
def test_invalid_values_are_config_errors_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=field):
        LoHaConfig(**{field: value})


def test_rank_and_alpha_patterns_match_dotted_suffixes() -> None:
    config = LoHaConfig(
        r=8, alpha=4, rank_pattern={"q_proj": 2, r"layers\.1\..*v_proj": 5}, alpha_pattern={"k_proj": 6}
    )
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 2
    assert config.rank_for("model.layers.1.self_attn.v_proj") == 5
    assert config.rank_for("model.layers.0.self_attn.v_proj") == 8
    assert config.scaling_for("model.layers.0.self_attn.k_proj") == 6 / 8
    assert config.scaling_for("model.layers.0.self_attn.q_proj") == 4 / 2


def _peft_dict(**kwargs: Any) -> dict[str, Any]:
    data = peft.LoHaConfig(**kwargs).to_dict()
    return json.loads(json.dumps(data, default=sorted))  # sets -> sorted lists, as written to disk


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_modules": ["q_proj", "v_proj"]},
        {
            "r": 4,
            "alpha": 12,
            "rank_dropout": 0.1,
            "module_dropout": 0.2,
            "use_effective_conv2d": True,
            "init_weights": False,
            "target_modules": ["q_proj", "v_proj"],
            "exclude_modules": ["lm_head"],
            "layers_to_transform": [0, 2],
            "layers_pattern": "layers",
            "rank_pattern": {"q_proj": 2},
            "alpha_pattern": {"v_proj": 3},
            "modules_to_save": ["score"],
            "task_type": "CAUSAL_LM",
        },
    ],
)
def test_peft_config_round_trips_through_grafting_unchanged(kwargs: dict[str, Any]) -> None:
    data = _peft_dict(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key PEFT writes is known: no "unknown keys" warning
        config = grafting.get_peft_config(data)
    assert isinstance(config, LoHaConfig)
    written = json.loads(config.to_json_string())
    assert written == data


def test_grafting_config_is_read_by_peft_with_the_same_values(tmp_path) -> None:
    config = LoHaConfig(r=6, alpha=3, rank_dropout=0.25, target_modules=["query"], rank_pattern={"query": 2})
    config.save_pretrained(tmp_path)
    theirs = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(theirs, peft.LoHaConfig)
    assert (theirs.r, theirs.alpha, theirs.rank_dropout, theirs.rank_pattern) == (6, 3, 0.25, {"query": 2})
    assert set(theirs.target_modules) == {"query"}
