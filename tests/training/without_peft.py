"""Training scenarios run with peft blocked: ``python -m tests.training.without_peft OUT [scenario ...]``.

Each scenario is written as a peft user writes it, with grafting's import lines, and leaves its
artifacts (checkpoints, saved adapters, the probe batch's logits) and a ``result.json`` under
``OUT/<scenario>``; a failure is recorded there with its traceback and the next scenario still runs.
tests/test_training_trainers.py checks the artifacts, with peft as the oracle.
"""

from __future__ import annotations

from tests.training.common import block_peft

if __name__ == "__main__":
    block_peft()  # before transformers is imported, as if peft were not installed

import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import save_file

from tests.training.common import (
    lm_dataset,
    lora_model,
    probe_logits,
    run_scenarios,
    texts,
    tokenizer,
    trainer_args,
)

STEPS, EVERY = 6, 3  # train this many steps, checkpoint and evaluate every EVERY steps


def save_logits(model: Any, folder: str) -> None:
    save_file({"logits": probe_logits(model).contiguous()}, os.path.join(folder, "probe_logits.safetensors"))


def evaluated_args(folder: str, **extra: Any) -> Any:
    """Train STEPS steps, evaluating and checkpointing every EVERY steps."""
    return trainer_args(
        folder,
        max_steps=STEPS,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-2,
        eval_strategy="steps",
        eval_steps=EVERY,
        save_strategy="steps",
        save_steps=EVERY,
        logging_steps=1,
        **extra,
    )


def scenario_trainer(out: str) -> dict[str, Any]:
    """Trainer with default arguments: train with checkpoints and evaluation, load the best, save_model; resume."""
    from grafting.integrations.transformers import Trainer

    train, evaluation = lm_dataset(32, seed=1), lm_dataset(8, seed=2)
    # The best checkpoint by eval loss is the last one when the loss falls; asking for the *highest* loss
    # makes it checkpoint-3, so the test sees load_best_model_at_end actually load something.
    args = evaluated_args(
        os.path.join(out, "run"), load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True
    )
    trainer = Trainer(
        model=lora_model(), args=args, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer()
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(os.path.join(out, "final"))
    save_logits(trainer.model, os.path.join(out, "final"))

    resumed = Trainer(
        model=lora_model(seed=123),  # another init: the checkpoint must bring the adapter back
        args=evaluated_args(os.path.join(out, "resumed")),
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer(),
    )
    resumed.train(resume_from_checkpoint=os.path.join(out, "run", f"checkpoint-{EVERY}"))
    return {
        "metrics": metrics,
        "label_names": trainer.label_names,
        "best_model_checkpoint": trainer.state.best_model_checkpoint,
        "log_history": trainer.state.log_history,
        "resumed_log_history": resumed.state.log_history,
    }


def scenario_sft(out: str) -> dict[str, Any]:
    """TRL's SFTTrainer on a text dataset: train, checkpoint, evaluate, save_model; resume."""
    from datasets import Dataset
    from trl import SFTConfig

    from grafting.integrations.trl import SFTTrainer

    train = Dataset.from_dict({"text": texts(32, seed=3)})
    evaluation = Dataset.from_dict({"text": texts(8, seed=4)})

    def config(folder: str, **extra: Any) -> SFTConfig:
        # bf16: SFTConfig's default is True; on CPU it would autocast to bfloat16
        return evaluated_args(folder, arguments=SFTConfig, max_length=16, bf16=False, **extra)

    trainer = SFTTrainer(
        model=lora_model(),
        # the highest eval loss is the best: checkpoint-3, so loading it at the end shows (as for Trainer)
        args=config(
            os.path.join(out, "run"), load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True
        ),
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer(),
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(os.path.join(out, "final"))
    save_logits(trainer.model, os.path.join(out, "final"))

    resumed = SFTTrainer(
        model=lora_model(seed=123),
        args=config(os.path.join(out, "resumed")),
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer(),
    )
    resumed.train(resume_from_checkpoint=os.path.join(out, "run", f"checkpoint-{EVERY}"))
    return {
        "metrics": metrics,
        "log_history": trainer.state.log_history,
        "best_model_checkpoint": trainer.state.best_model_checkpoint,
    }


def scenario_accelerate(out: str) -> dict[str, Any]:
    """A plain accelerate loop, saved with ``unwrap_model(...).save_pretrained`` from the main process."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    accelerator = Accelerator(cpu=True)
    data = lm_dataset(16, seed=5).remove_columns("text").with_format("torch")
    model = lora_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer, loader = accelerator.prepare(model, optimizer, DataLoader(data, batch_size=4))
    model.train()
    losses = []
    for batch in loader:
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    accelerator.wait_for_everyone()
    folder = os.path.join(out, "adapter")
    accelerator.unwrap_model(model).save_pretrained(folder, is_main_process=accelerator.is_main_process)
    save_logits(accelerator.unwrap_model(model), folder)
    return {"losses": losses}


SCENARIOS: dict[str, Callable[[str], dict[str, Any]]] = {
    "trainer": scenario_trainer,
    "sft": scenario_sft,
    "accelerate": scenario_accelerate,
}


def main(out: str, names: list[str]) -> None:
    run_scenarios(out, names, SCENARIOS)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
