"""grafting's Trainer with several adapters, and with models that are not grafting's (it must defer to Trainer).

In-process: a grafting model is never a peft model to transformers, installed or not.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainingArguments

import grafting
from grafting.integrations.transformers import Trainer
from grafting.testing import assert_close, assert_identical
from tests.helpers import base_model, randomize
from tests.toy_methods import ToyDeltaConfig
from tests.training.common import lm_dataset, trainer_args

pytestmark = pytest.mark.usefixtures("toy_methods")  # the adapters here are TOY_DELTA (tests/toy_methods.py)


def two_adapters(seed: int) -> Any:
    """TOY_DELTA "default" (active, trained) and a second one, "other" (inactive, so untrained), seeded."""
    model = grafting.get_peft_model(base_model("llama"), ToyDeltaConfig(target_modules=["q_proj"]))
    model.add_adapter("other", ToyDeltaConfig(target_modules=["v_proj"]))
    randomize(model, seed)
    return model


def args(folder: Path) -> Any:
    return trainer_args(str(folder), max_steps=4, save_steps=2, per_device_train_batch_size=4, learning_rate=1e-2)


def adapter_state(model: Any) -> dict[str, dict[str, torch.Tensor]]:
    return {name: grafting.get_peft_model_state_dict(model, adapter_name=name) for name in ("default", "other")}


def test_checkpoint_with_two_adapters_resumes_both(tmp_path: Path) -> None:
    data = lm_dataset(16, seed=6)
    first = Trainer(model=two_adapters(0), args=args(tmp_path / "run"), train_dataset=data)
    first.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(checkpoint / "other"))

    model = two_adapters(1)  # other random values everywhere: the checkpoint must bring both back
    resumed = Trainer(model=model, args=args(tmp_path / "resumed"), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert model.active_adapters == ["default"]
    ours, theirs = adapter_state(model), adapter_state(first.model)
    assert_identical(ours["other"], theirs["other"])  # inactive: loaded, never trained
    start = grafting.PeftModel.from_pretrained(base_model("llama"), str(checkpoint))
    assert_close(ours["default"], theirs["default"], changed_from=grafting.get_peft_model_state_dict(start))


def test_other_models_are_left_to_trainer(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model = base_model("llama")
    trainer = Trainer(model=model, args=args(tmp_path / "plain"), train_dataset=lm_dataset(16, seed=7))
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    files = set(os.listdir(tmp_path / "saved"))
    assert "model.safetensors" in files
    assert "adapter_config.json" not in files
    assert_identical(
        load_file(tmp_path / "saved" / "model.safetensors")["lm_head.weight"], model.lm_head.weight.detach()
    )


class RankArguments(TrainingArguments):
    """TrainingArguments of the main process (``main``) or of another rank (``process_index != 0`` in a real run)."""

    main = True

    @property
    def should_save(self) -> bool:
        return self.main


def test_a_gathered_state_dict_is_saved_by_the_main_process_only(tmp_path: Path) -> None:
    """What ``Trainer.save_model`` does under FSDP with FULL_STATE_DICT (transformers 5.24, trainer.py:4105-4108).

    Every rank calls ``_save(dir, state_dict=accelerator.get_state_dict(model))``: the whole state dict on the
    main process, an empty one elsewhere. The main process saves the adapter from it; the others do nothing.
    """
    from safetensors.torch import load_file

    model = two_adapters(0)
    trainer = Trainer(model=model, args=RankArguments(str(tmp_path / "run"), report_to=[], use_cpu=True))
    gathered = {k: v * 2 + 1 for k, v in model.state_dict().items()}  # not the model's values: must come from here
    trainer._save(str(tmp_path / "main"), state_dict=gathered)
    expected = grafting.get_peft_model_state_dict(model, state_dict=gathered)
    assert_identical(load_file(tmp_path / "main" / "adapter_model.safetensors"), expected)

    trainer.args.main = False
    trainer._save(str(tmp_path / "other"), state_dict={})
    assert not (tmp_path / "other").exists()
