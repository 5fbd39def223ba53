"""OFTConfig: validation, adapter_config.json as PEFT writes it, the saved-shape check."""

from __future__ import annotations

import json
import warnings
from typing import Any

import peft
import pytest

import grafting
from grafting.errors import ConfigError
from grafting_oft import OFTConfig


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 4}, "exactly one of r"),  # oft_block_size keeps its default 32
        ({"r": 0, "oft_block_size": 0}, "exactly one of r"),
        ({"oft_block_size": -1}, "oft_block_size"),
        ({"oft_block_size": 2.5}, "oft_block_size"),
        ({"module_dropout": 1.5}, "module_dropout"),
        ({"eps": 0}, "eps"),
        ({"bias": "lora_only"}, "bias"),
        ({"coft": "yes"}, "coft"),
        ({"num_cayley_neumann_terms": 0}, "num_cayley_neumann_terms"),
    ],
)
def test_invalid_values_are_config_errors_naming_the_field(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        OFTConfig(**kwargs)


def _peft_dict(**kwargs: Any) -> dict[str, Any]:
    return json.loads(json.dumps(peft.OFTConfig(**kwargs).to_dict(), default=sorted))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_modules": ["q_proj", "v_proj"]},
        {
            "r": 4,
            "oft_block_size": 0,
            "module_dropout": 0.1,
            "coft": True,
            "eps": 1e-3,
            "block_share": True,
            "use_cayley_neumann": False,
            "num_cayley_neumann_terms": 7,
            "init_weights": False,
            "bias": "oft_only",
            "target_modules": ["q_proj"],
            "exclude_modules": ["lm_head"],
            "layers_to_transform": [0],
            "layers_pattern": "layers",
            "modules_to_save": ["score"],
            "task_type": "CAUSAL_LM",
        },
    ],
)
def test_peft_config_round_trips_through_grafting_unchanged(kwargs: dict[str, Any]) -> None:
    data = _peft_dict(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key PEFT writes is known
        config = grafting.get_peft_config(data)
    assert isinstance(config, OFTConfig)
    assert json.loads(config.to_json_string()) == data


def test_grafting_config_is_read_by_peft_without_warnings(tmp_path) -> None:
    OFTConfig(r=2, oft_block_size=0, coft=True, target_modules=["query"]).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "retrain your Cayley-Neumann adapter" warning: peft_version is written
        theirs = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(theirs, peft.OFTConfig)
    assert (theirs.r, theirs.oft_block_size, theirs.coft, theirs.peft_type) == (2, 0, True, peft.PeftType.OFT)


def test_saved_shapes_that_contradict_the_config_are_reported() -> None:
    registry = grafting.get_registry()

    def check(**kwargs: object) -> list[str]:
        return registry.call(registry.method("OFT"), "grafting_check_saved_shapes", **kwargs)  # type: ignore[no-any-return]

    key = "base_model.model.layers.0.q_proj.oft_R.weight"
    config = OFTConfig(oft_block_size=4)
    assert check(config=config, shapes={key: (4, 6), "base_model.model.emb.oft_embedding_R.weight": (2, 6)}) == []
    assert check(config=config, shapes={key: (4, 7)}) == [
        f"{key}: shape [4, 7] is not (blocks, b·(b-1)/2) for any block size b"
    ]
    shared = OFTConfig(oft_block_size=4, block_share=True)
    assert check(config=shared, shapes={key: (4, 6)}) == [f"{key}: 4 blocks, but block_share=True keeps one"]


def test_grafting_plugins_lists_the_method(capsys) -> None:
    from grafting.cli import main

    assert main(["plugins"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("OFT "))
    assert "grafting-oft" in line
    assert "grafting_oft.plugin" in line


@pytest.mark.parametrize(
    ("version", "warns"), [(None, True), ("0.17.1", True), ("0.18.0", False), ("0.21.2@abc", False)]
)
def test_a_cayley_neumann_file_from_before_peft_0_18_warns_as_peft_does(version: str | None, warns: bool) -> None:
    data = _peft_dict(target_modules=["q"])
    data.pop("peft_version")
    if version is not None:
        data["peft_version"] = version
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grafting.get_peft_config(data)
    assert any("changed the series" in str(w.message) for w in caught) == warns
