"""grafting's Trainer allocates AdaLoRA's ranks by itself: update_and_allocate after every optimizer
step, with the gradients still there, ending on the final rank_pattern that PEFT then loads."""

from __future__ import annotations

from typing import Any

import peft
import torch
from datasets import Dataset
from grafting_adalora import RankAllocator
from transformers import TrainingArguments

from grafting import AdaLoraConfig, get_peft_model
from grafting.integrations.transformers import Trainer
from grafting.testing import assert_close, model_output, sample_inputs, tiny_model

STEPS = 6


def _data(rows: int = 24, length: int = 8) -> Dataset:
    ids = torch.randint(4, 64, (rows, length), generator=torch.Generator().manual_seed(0)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def test_adalora_trainer_allocates_the_ranks_each_step(tmp_path, monkeypatch) -> None:
    config = AdaLoraConfig(
        init_r=4, target_r=2, tinit=1, tfinal=2, total_step=STEPS, target_modules=["q_proj", "v_proj"]
    )
    model = get_peft_model(tiny_model("llama", seed=0), config)
    seen: list[tuple[int, bool]] = []
    original = RankAllocator.on_optimizer_step

    def spy(self: RankAllocator, layers: dict[str, Any], global_step: int) -> None:
        seen.append((global_step, all(a.lora_E.grad is not None for a in layers.values())))
        original(self, layers, global_step)

    monkeypatch.setattr(RankAllocator, "on_optimizer_step", spy)
    args = TrainingArguments(
        str(tmp_path / "run"),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    Trainer(model=model, args=args, train_dataset=_data()).train()

    assert seen == [(step, True) for step in range(STEPS)]  # every step, before zero_grad
    pattern = model.peft_config["default"].rank_pattern
    assert len(pattern) == 4
    assert sum(map(sum, pattern.values())) == 2 * 4  # target_r per layer on average
    layers = {n.split(".adapters.")[0]: m for n, m in model.named_modules() if n.endswith(".adapters.default")}
    for name, kept in pattern.items():
        e = layers[f"base_model.model.{name.removesuffix('.lora_E')}"].lora_E.detach().view(-1)
        assert (e[~torch.tensor(kept)] == 0).all(), name

    model.eval()
    probe = sample_inputs("llama", batch=2, length=6)
    expected = model_output(model, probe)
    model.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama", seed=0), tmp_path / "adapter").eval()
    assert_close(model_output(theirs, probe), expected, changed_from=model_output(tiny_model("llama", seed=0), probe))
