"""transformers' Trainer, TRL's SFTTrainer and accelerate training grafting models without peft installed.

The scenarios (tests/training/without_peft.py) run once, in a subprocess where ``import peft`` fails,
written as a peft user writes them with grafting's import lines. The tests check what they left:
adapter-only checkpoints in PEFT's format that peft loads with the same logits, evaluation losses,
the best checkpoint loaded at the end, and resumed runs that end on the uninterrupted run's weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from grafting.io.transaction import is_bookkeeping
from tests.training.oracle import (
    adapter_tensors,
    assert_adapter_only_checkpoint,
    assert_loads_with_same_logits,
    assert_same_tensors,
    python,
    recorded_logits,
    result,
    run_once,
)
from tests.training.without_peft import EVERY, STEPS

# One worker for the module's tests (where xdist honours groups); run_once makes the scenario run once anyway.
pytestmark = pytest.mark.xdist_group("training_without_peft")


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_once(
        tmp_path_factory, "without_peft", lambda folder: python("-m", "tests.training.without_peft", str(folder))
    )


@pytest.mark.parametrize("scenario", ["trainer", "sft", "accelerate"])
def test_scenarios_ran_without_peft(out: Path, scenario: str) -> None:
    blocked = result(out / scenario)["peft"]
    assert blocked["import_peft"] is False
    assert not blocked["transformers_is_peft_available"]
    assert not blocked["accelerate_is_peft_available"]


def test_trainer_keeps_columns_finds_labels_and_evaluates(out: Path) -> None:
    data = result(out / "trainer")
    assert data["label_names"] == ["labels"]  # read from the wrapped model's forward
    assert "eval_loss" in data["metrics"]
    eval_steps = [entry["step"] for entry in data["log_history"] if "eval_loss" in entry]
    assert eval_steps == [EVERY, STEPS, STEPS]  # two during training, then trainer.evaluate()
    losses = [entry["loss"] for entry in data["log_history"] if "loss" in entry]
    assert len(losses) == STEPS
    assert all(0 < loss < 10 for loss in losses)


@pytest.mark.parametrize("scenario", ["trainer", "sft"])
def test_checkpoints_hold_the_adapter_and_the_trainer_state(out: Path, scenario: str) -> None:
    result(out / scenario)
    for step in (EVERY, STEPS):
        assert_adapter_only_checkpoint(out / scenario / "run" / f"checkpoint-{step}")


@pytest.mark.parametrize("scenario", ["trainer", "sft"])
def test_save_model_output_loads_in_peft_with_the_same_logits(out: Path, scenario: str) -> None:
    result(out / scenario)
    final = out / scenario / "final"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "training_args.bin"} <= {
        p.name for p in final.iterdir()
    }
    assert not any((final / name).exists() for name in ("model.safetensors", "pytorch_model.bin"))
    assert_loads_with_same_logits(final, recorded_logits(final))


@pytest.mark.parametrize("scenario", ["trainer", "sft"])
def test_load_best_model_at_end_loads_the_best_checkpoint(out: Path, scenario: str) -> None:
    data = result(out / scenario)
    run_dir = out / scenario / "run"
    assert Path(data["best_model_checkpoint"]).name == f"checkpoint-{EVERY}"
    best, last = adapter_tensors(run_dir / f"checkpoint-{EVERY}"), adapter_tensors(run_dir / f"checkpoint-{STEPS}")
    final = adapter_tensors(out / scenario / "final")
    assert_same_tensors(final, best, exact=True)  # weights copied from the file, bit for bit
    assert any(not torch.equal(final[k], last[k]) for k in final)


@pytest.mark.parametrize("scenario", ["trainer", "sft"])
def test_resumed_run_ends_on_the_uninterrupted_runs_weights(out: Path, scenario: str) -> None:
    result(out / scenario)
    start = adapter_tensors(out / scenario / "run" / f"checkpoint-{EVERY}")
    uninterrupted = adapter_tensors(out / scenario / "run" / f"checkpoint-{STEPS}")
    resumed_dir = out / scenario / "resumed"
    assert not (resumed_dir / f"checkpoint-{EVERY}").exists()  # it did start from the checkpoint
    resumed = adapter_tensors(resumed_dir / f"checkpoint-{STEPS}")
    # computed by two runs: equal up to rounding, and far from where the checkpoint started them
    assert_same_tensors(resumed, uninterrupted, exact=False, changed_from=start)


def test_accelerate_loop_saves_an_adapter_peft_loads(out: Path) -> None:
    data = result(out / "accelerate")
    assert len(data["losses"]) == 4
    folder = out / "accelerate" / "adapter"
    assert {p.name for p in folder.iterdir() if not is_bookkeeping(p.name)} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "probe_logits.safetensors",
    }
    assert_loads_with_same_logits(folder, recorded_logits(folder))
