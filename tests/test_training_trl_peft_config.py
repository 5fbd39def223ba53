"""TRL's trainers given ``peft_config=`` a grafting config, without peft installed (tests/training/trl_peft_config.py).

TRL's documented path (``SFTTrainer("model-id", peft_config=LoraConfig(...))``) needs peft; grafting's
subclasses wrap the model themselves. The scenarios run once in a subprocess where ``import peft``
fails; these tests check what they left, with peft as the oracle: the model was wrapped by grafting
with TRL's defaults (input gradients for gradient checkpointing), only the adapter trained, the saved
adapter loads in peft with the same logits, and SFT's losses are the ones TRL + peft give.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from grafting.testing import assert_close
from tests.training.common import LORA, texts, tokenizer
from tests.training.oracle import assert_loads_with_same_logits, python, recorded_logits, result, run_once
from tests.training.trl_peft_config import SCENARIOS, args, model_folder

pytestmark = pytest.mark.xdist_group("training_trl_peft_config")


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_once(
        tmp_path_factory, "trl_peft_config", lambda folder: python("-m", "tests.training.trl_peft_config", str(folder))
    )


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_trainer_wraps_the_model_id_with_grafting_without_peft(out: Path, scenario: str) -> None:
    data = result(out / scenario)
    assert data["peft"] == {
        "import_peft": False,
        "transformers_is_peft_available": False,
        "accelerate_is_peft_available": False,
    }
    assert data["model_class"].startswith("grafting.")
    assert ".PeftModelFor" in data["model_class"]
    assert data["input_grads_hook"]  # TRL's default for adapters under gradient checkpointing
    assert data["trainable"]
    assert all(".adapters.default." in name or "modules_to_save" in name for name in data["trainable"])
    assert len(data["losses"]) == 3


@pytest.mark.parametrize("scenario", ["sft", "dpo", "grpo"])
def test_saved_adapter_loads_in_peft_with_the_same_logits(out: Path, scenario: str) -> None:
    result(out / scenario)
    final = out / scenario / "final"
    assert_loads_with_same_logits(final, recorded_logits(final))


def test_reward_adapter_loads_in_peft(out: Path) -> None:
    import peft
    from transformers import AutoModelForSequenceClassification

    result(out / "reward")
    base = AutoModelForSequenceClassification.from_pretrained(out / "reward" / "base", num_labels=1)
    model = peft.PeftModel.from_pretrained(base, out / "reward" / "final")
    assert model.peft_config["default"].target_modules == set(LORA["target_modules"])


def test_sft_losses_are_trl_with_peft_losses(out: Path, tmp_path: Path) -> None:
    """The same script with TRL's own SFTTrainer and peft's LoraConfig: same seed, same run."""
    import peft
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    ours = result(out / "sft")["losses"]
    trainer = SFTTrainer(
        model_folder(str(tmp_path)),
        args=args(SFTConfig, str(tmp_path), max_length=16),
        train_dataset=Dataset.from_dict({"text": texts(8, seed=3)}),
        processing_class=tokenizer(),
        peft_config=peft.LoraConfig(**LORA),
    )
    trainer.train()
    theirs = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert os.path.isdir(tmp_path / "base")
    assert_close(ours, theirs)
