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
import torch
from safetensors.torch import load_file

from grafting.testing import assert_close
from tests.training.common import LORA, TEMPLATE_TOKENS, texts, tokenizer
from tests.training.oracle import assert_loads_with_same_logits, python, recorded_logits, result, run_once
from tests.training.trl_peft_config import SCENARIOS, args, chat_template_sft, embedding_rows, model_folder

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


def test_a_cloned_chat_template_trains_the_added_rows_as_trl_with_peft(out: Path, tmp_path: Path) -> None:
    """``chat_template_path`` adds tokens: their embedding rows train (and lm_head), the others do not, as in TRL."""
    import peft
    from trl import SFTTrainer

    ours = result(out / "sft_chat_template")
    rows = load_file(out / "sft_chat_template" / "embedding_rows.safetensors")
    trainer = chat_template_sft(str(tmp_path), SFTTrainer, peft.LoraConfig(**LORA))
    before = embedding_rows(trainer.model)
    trainer.train()
    after = embedding_rows(trainer.model)
    config = trainer.model.peft_config["default"]

    assert ours["vocabulary"] == len(trainer.processing_class) > 64  # resized, to a multiple of 64 as TRL does
    assert ours["trainable_token_indices"] == config.trainable_token_indices
    assert ours["modules_to_save"] == list(config.modules_to_save) == ["lm_head"]
    added = set(config.trainable_token_indices["embed_tokens"])
    template = set(trainer.processing_class.convert_tokens_to_ids(TEMPLATE_TOKENS))
    assert template <= added

    def changed(first: torch.Tensor, last: torch.Tensor) -> set[int]:
        return {int(i) for i in (first != last).any(dim=1).nonzero().flatten()}

    # the template's tokens occur in the conversations and train; rows never seen or not added stay
    assert template <= changed(rows["before"], rows["after"]) <= added
    assert changed(rows["before"], rows["after"]) == changed(before, after)
    assert_close(rows["before"], before)
    assert_close(rows["after"], after, changed_from=rows["before"])
    theirs = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert_close(ours["losses"], theirs)
