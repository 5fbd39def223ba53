"""LoRA's side of tests/test_bounded_options.py (issue 25's row 8): its own patterns and options that could
make a build or a load hang are refused at once with a ConfigError naming the option."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from lora_model_helpers import adapted, base_model, lora

import grafting
from grafting import ConfigError
from grafting.testing import edit_saved_config

CATASTROPHIC = r"((\w|\.)+)+Z"


def peft_folder(tmp_path: Path, **changes: Any) -> Path:
    """A saved LoRA adapter whose adapter_config.json is then edited with ``changes``."""
    adapted("llama").save_pretrained(tmp_path)
    edit_saved_config(tmp_path, **changes)
    return tmp_path


OPTIONS = {
    "rank_pattern": {"rank_pattern": {CATASTROPHIC: 2}},
    "alpha_pattern": {"alpha_pattern": {CATASTROPHIC: 2}},
    "init_lora_weights": {"init_lora_weights": "pissa_niter_1000000000"},
}


@pytest.mark.parametrize("option", OPTIONS)
def test_row08_a_pattern_or_count_that_would_hang_is_refused_on_build_and_on_load(option: str, tmp_path: Path) -> None:
    changes = OPTIONS[option]
    start = time.monotonic()
    with pytest.raises(ConfigError, match=rf"LoraConfig\.{option}"):
        grafting.LoraConfig(**{"target_modules": ["q_proj"], **changes})
    spent = time.monotonic() - start
    folder = peft_folder(tmp_path, **changes)
    base = base_model("llama")
    start = time.monotonic()  # the refusals are timed, not the save and the base model the test builds
    with pytest.raises(ConfigError, match=option):
        grafting.PeftModel.from_pretrained(base, folder)
    assert spent + time.monotonic() - start < 30  # the hang ran past 30 s; a refusal is immediate


def test_row08_too_many_pattern_keys_are_refused_and_a_thousand_load_quickly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"rank_pattern holds 20000 keys; the limit is 1000"):
        lora("llama", rank_pattern={f"k{i}": 2 for i in range(20000)})
    keys = {f"model.layers.{i}.self_attn.k_proj": 2 for i in range(998)}
    with pytest.warns(UserWarning, match="match none of the adapted modules"):
        adapted("llama", lora("llama", rank_pattern={**keys, "q_proj": 3, r"v_pr\w+": 1})).save_pretrained(tmp_path)
    start = time.monotonic()
    with pytest.warns(UserWarning, match="match none of the adapted modules"):
        loaded = grafting.PeftModel.from_pretrained(base_model("llama"), tmp_path)
    assert time.monotonic() - start < 30  # 20,000 keys took 18-29 s
    ranks = {name.rsplit(".", 1)[-1]: layer.adapters["default"].r for name, layer in loaded.base_model.adapted_layers()}
    assert ranks == {"q_proj": 3, "v_proj": 1}


def test_row08_loftq_iterations_are_bounded() -> None:
    with pytest.raises(ConfigError, match=r"loftq_iter must be an integer in \[1, 1000\]"):
        grafting.LoftQConfig(loftq_iter=10**9)
