"""The task classes' forward signatures: what transformers' Trainer reads to keep columns and find labels.

transformers reads a model's inputs from ``inspect.signature(model.forward)`` and its label names from
``inspect.signature(type(model).forward)``; PEFT's task classes declare their inputs there, so the
plain ``transformers.Trainer`` keeps the dataset's columns and computes ``eval_loss`` for them.
(grafting's models are never peft models to transformers, installed or not, so this runs in-process.)
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

import grafting
from grafting.testing import assert_close
from tests.helpers import ARCHS, base_model, inputs, logits, randomize, toy
from tests.helpers import toy_adapted as adapted

pytestmark = pytest.mark.usefixtures("toy_methods")  # the adapters here are TOY_DELTA (tests/toy_methods.py)

TASK_CLASSES = [
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftModelForQuestionAnswering",
    "PeftModelForFeatureExtraction",
    "PeftMixedModel",
]


def parameters(fn: object) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]  # type: ignore[arg-type]


@pytest.mark.parametrize("name", TASK_CLASSES)
def test_forward_declares_the_inputs_peft_declares(name: str) -> None:
    import peft

    ours, theirs = parameters(getattr(grafting, name).forward), parameters(getattr(peft, name).forward)
    assert [(n, kind) for n, kind, _ in ours] == [(n, kind) for n, kind, _ in theirs]
    assert [d for *_, d in ours] == [d for *_, d in theirs]


@pytest.mark.parametrize("arch", ARCHS)
def test_keyword_and_positional_calls_give_the_wrapped_models_output(arch: str) -> None:
    model = adapted(arch)
    randomize(model, 4)
    batch = inputs(arch)
    expected = logits(model.get_base_model(), arch)  # the wrapped model, adapters in place, called directly
    assert_close(model(**batch).logits, expected, changed_from=logits(base_model(arch), arch))
    first = model(
        batch["input_ids"],
        batch["attention_mask"],
        **{k: v for k, v in batch.items() if "mask" not in k and k != "input_ids"},
    )
    assert_close(first.logits, expected)


def test_inputs_outside_the_signature_reach_the_wrapped_model() -> None:
    model = adapted("llama")
    randomize(model, 5)
    batch = {**inputs("llama"), "position_ids": torch.tensor([[0, 7, 2, 11, 4]] * 3)}  # in **kwargs
    with torch.no_grad():
        expected = model.get_base_model()(**batch).logits
        assert_close(model(**batch).logits, expected, changed_from=model(**inputs("llama")).logits)


def test_plain_transformers_trainer_keeps_columns_and_evaluates(tmp_path: Path) -> None:
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    ids = torch.randint(4, 64, (8, 6), generator=torch.Generator().manual_seed(0))
    rows = {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": ids.tolist()}
    data = Dataset.from_dict({**rows, "text": ["unused"] * 8})  # a column the model does not take: dropped
    model = grafting.get_peft_model(base_model("llama"), toy("llama"))
    args = TrainingArguments(
        str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True, disable_tqdm=True
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()  # the default collator would fail on the string column had it been kept
    assert trainer.label_names == ["labels"]
    assert "eval_loss" in trainer.evaluate()
