"""TRL's rule for tokens added by a cloned chat template, on grafting configs (grafting.integrations.trl).

The end-to-end run against TRL with peft is in tests/test_training_trl_peft_config.py; these check the
config rule alone: the ids join ``trainable_token_indices["embed_tokens"]``, ``lm_head`` joins
``modules_to_save`` with a warning, the user's config is not changed, and a method that cannot train
token rows is refused by name.
"""

from __future__ import annotations

import pytest

import grafting
from grafting.integrations.trl import with_added_tokens
from grafting.testing import tiny_model


def test_added_tokens_train_with_lm_head_and_the_users_config_is_kept() -> None:
    config = grafting.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [3]})
    with pytest.warns(grafting.GraftingWarning, match="'lm_head' is not in PEFT's `modules_to_save`"):
        updated = with_added_tokens(config, [64, 65], tiny_model("llama"))
    assert updated.trainable_token_indices == {"embed_tokens": [3, 64, 65]}
    assert updated.modules_to_save == ["lm_head"]
    assert config.trainable_token_indices == {"embed_tokens": [3]}
    assert config.modules_to_save is None


def test_no_added_tokens_leave_the_config_as_it_is() -> None:
    config = grafting.LoraConfig(r=2, target_modules=["q_proj"])
    assert with_added_tokens(config, [], tiny_model("llama")) is config


def test_a_method_without_trainable_tokens_is_refused_by_name() -> None:
    config = grafting.IA3Config(target_modules=["q_proj"], feedforward_modules=[])
    with pytest.raises(grafting.ConfigError, match="IA3 does not take"):
        with_added_tokens(config, [64], tiny_model("llama"))
