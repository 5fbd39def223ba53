"""LoKrConfig: validation, per-module rank and alpha, and adapter_config.json as PEFT writes it."""

from __future__ import annotations

import json
import warnings
from typing import Any

import peft
import pytest

import grafting
from grafting.errors import ConfigError
from grafting_lokr import LoKrConfig


def test_grafting_resolves_the_config_class_and_the_method() -> None:
    assert grafting.LoKrConfig is LoKrConfig
    method = grafting.get_method("LOKR")
    assert (method.config_class, method.name, method.level) == (LoKrConfig, "lokr", "layer")
    assert LoKrConfig().peft_type is grafting.PeftType.LOKR


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("r", 0),
        ("r", True),
        ("alpha", 0),
        ("rank_dropout", 1.0),
        ("module_dropout", -0.1),
        ("init_weights", "gaussian"),
        ("init_weights", 1),
        ("use_effective_conv2d", "yes"),
        ("decompose_both", 1),
        ("decompose_factor", 0),
        ("decompose_factor", -2),
        ("decompose_factor", 2.0),
        ("decompose_factor", True),
        ("rank_dropout_scale", None),
        ("rank_pattern", {"q_proj": 0}),
        ("alpha_pattern", {"q_proj": "big"}),
    ],
)
def test_invalid_values_are_config_errors_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"LoKrConfig.{field}"):
        LoKrConfig(**{field: value})


def test_rank_and_alpha_patterns_match_dotted_suffixes() -> None:
    config = LoKrConfig(
        r=8, alpha=4, rank_pattern={"q_proj": 2, r"layers\.1\..*v_proj": 5}, alpha_pattern={"k_proj": 6}
    )
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 2
    assert config.rank_for("model.layers.1.self_attn.v_proj") == 5
    assert config.rank_for("model.layers.0.self_attn.v_proj") == 8
    assert config.scaling_for("model.layers.0.self_attn.k_proj") == 6 / 8


def _peft_dict(**kwargs: Any) -> dict[str, Any]:
    data = peft.LoKrConfig(**kwargs).to_dict()
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
            "decompose_both": True,
            "decompose_factor": 4,
            "rank_dropout_scale": True,
            "init_weights": "lycoris",
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
    assert isinstance(config, LoKrConfig)
    assert json.loads(config.to_json_string()) == data


def test_grafting_config_is_read_by_peft_with_the_same_values(tmp_path) -> None:
    config = LoKrConfig(
        r=6, alpha=3, decompose_both=True, decompose_factor=8, init_weights="lycoris", target_modules=["q"]
    )
    config.save_pretrained(tmp_path)
    theirs = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(theirs, peft.LoKrConfig)
    assert (theirs.r, theirs.alpha, theirs.decompose_both, theirs.decompose_factor, theirs.init_weights) == (
        6,
        3,
        True,
        8,
        "lycoris",
    )


def test_the_install_hint_names_the_distribution() -> None:
    from grafting.registry.plugins import Registry, missing_method_message

    assert "pip install grafting-lokr" in missing_method_message("LOKR", Registry(load_entry_points=False))
