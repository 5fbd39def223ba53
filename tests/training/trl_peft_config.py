"""TRL's trainers given a model id and ``peft_config=`` a grafting config, run with peft blocked.

``python -m tests.training.trl_peft_config OUT [scenario ...]``: each scenario writes as a TRL user
does (``Trainer("model-id", peft_config=LoraConfig(...))``) with grafting's import lines, and leaves
its saved adapter, the probe batch's logits and a ``result.json`` under ``OUT/<scenario>``;
tests/test_training_trl_peft_config.py checks them with peft as the oracle.
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
    LORA,
    base_model,
    chat_template_source,
    conversations,
    probe_logits,
    run_scenarios,
    texts,
    tokenizer,
    trainer_args,
)

STEPS = 3


def model_folder(out: str, *, reward: bool = False) -> str:
    """The tiny Llama saved where a model id points (the Hub's layout), with its tokenizer."""
    folder = os.path.join(out, "base")
    model = base_model()
    model.config.pad_token_id = 0
    if reward:
        model.config.architectures = ["LlamaForSequenceClassification"]
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def adapter_facts(trainer: Any, out: str) -> dict[str, Any]:
    """What the trainer made of the model id and config, and the adapter it saved."""
    model = trainer.model
    final = os.path.join(out, "final")
    trainer.save_model(final)
    facts: dict[str, Any] = {
        "model_class": f"{type(model).__module__}.{type(model).__name__}",
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "input_grads_hook": getattr(model.get_base_model(), "_require_grads_hook", None) is not None,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
    }
    if not trainer.args.output_dir.endswith("reward"):
        save_file({"logits": probe_logits(model).contiguous()}, os.path.join(final, "probe_logits.safetensors"))
    return facts


def args(config_class: Any, out: str, **extra: Any) -> Any:
    return trainer_args(
        os.path.join(out, "run"),
        arguments=config_class,
        max_steps=STEPS,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        bf16=False,
        gradient_checkpointing=True,
        **extra,
    )


def scenario_sft(out: str) -> dict[str, Any]:
    from datasets import Dataset
    from trl import SFTConfig

    from grafting import LoraConfig
    from grafting.integrations.trl import SFTTrainer

    trainer = SFTTrainer(
        model_folder(out),
        args=args(SFTConfig, out, max_length=16),
        train_dataset=Dataset.from_dict({"text": texts(8, seed=3)}),
        processing_class=tokenizer(),
        peft_config=LoraConfig(**LORA),
    )
    trainer.train()
    return adapter_facts(trainer, out)


def preferences(n: int) -> Any:
    from datasets import Dataset

    rows = texts(3 * n, seed=7)
    return Dataset.from_dict({"prompt": rows[:n], "chosen": rows[n : 2 * n], "rejected": rows[2 * n :]})


def scenario_dpo(out: str) -> dict[str, Any]:
    from trl import DPOConfig

    from grafting import LoraConfig
    from grafting.integrations.trl import DPOTrainer

    trainer = DPOTrainer(
        model_folder(out),
        args=args(DPOConfig, out, max_length=24),
        train_dataset=preferences(8),
        processing_class=tokenizer(),
        peft_config=LoraConfig(**LORA),
    )
    trainer.train()
    return adapter_facts(trainer, out)


def scenario_grpo(out: str) -> dict[str, Any]:
    from datasets import Dataset
    from trl import GRPOConfig

    from grafting import LoraConfig
    from grafting.integrations.trl import GRPOTrainer

    def reward(completions: list[str], **_: Any) -> list[float]:
        return [float(len(c.split())) for c in completions]

    trainer = GRPOTrainer(
        model_folder(out),
        reward_funcs=reward,
        args=args(GRPOConfig, out, max_completion_length=4, num_generations=2, generation_batch_size=2),
        train_dataset=Dataset.from_dict({"prompt": texts(8, seed=5)}),
        processing_class=tokenizer(),
        peft_config=LoraConfig(**LORA),
    )
    trainer.train()
    return adapter_facts(trainer, out)


def scenario_reward(out: str) -> dict[str, Any]:
    from trl import RewardConfig

    from grafting import LoraConfig
    from grafting.integrations.trl import RewardTrainer

    data = preferences(8).remove_columns("prompt")
    trainer = RewardTrainer(
        model_folder(out, reward=True),
        args=args(RewardConfig, out, max_length=16),
        train_dataset=data,
        processing_class=tokenizer(),
        peft_config=LoraConfig(**{**LORA, "task_type": "SEQ_CLS"}),
    )
    trainer.train()
    return adapter_facts(trainer, out)


def chat_template_sft(out: str, trainer_class: Any, peft_config: Any) -> Any:
    """SFT on conversations with ``chat_template_path`` a tokenizer that adds tokens (shared with the oracle run)."""
    from trl import SFTConfig

    return trainer_class(
        model_folder(out),
        args=args(SFTConfig, out, max_length=32, chat_template_path=chat_template_source(out)),
        train_dataset=conversations(8, seed=9),
        processing_class=tokenizer(),
        peft_config=peft_config,
    )


def embedding_rows(model: Any) -> torch.Tensor:
    """The input embedding's rows as the adapted model computes them (trainable tokens included)."""
    layer = model.get_input_embeddings()
    with torch.no_grad():
        return layer(torch.arange(layer.weight.shape[0])).detach().clone()


def scenario_sft_chat_template(out: str) -> dict[str, Any]:
    from grafting import LoraConfig
    from grafting.integrations.trl import SFTTrainer

    trainer = chat_template_sft(out, SFTTrainer, LoraConfig(**LORA))
    before = embedding_rows(trainer.model)
    trainer.train()
    save_file(
        {"before": before, "after": embedding_rows(trainer.model)},
        os.path.join(out, "embedding_rows.safetensors"),
    )
    config = trainer.model.peft_config["default"]
    return {
        **adapter_facts(trainer, out),
        "vocabulary": len(trainer.processing_class),
        "trainable_token_indices": config.trainable_token_indices,
        "modules_to_save": config.modules_to_save,
    }


SCENARIOS: dict[str, Callable[[str], dict[str, Any]]] = {
    "sft": scenario_sft,
    "sft_chat_template": scenario_sft_chat_template,
    "dpo": scenario_dpo,
    "grpo": scenario_grpo,
    "reward": scenario_reward,
}


def main(out: str, names: list[str]) -> None:
    run_scenarios(out, names, SCENARIOS)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
