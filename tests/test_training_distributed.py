"""DDP and FSDP2 under ``torchrun --nproc_per_node 2`` (gloo, CPU), without peft: ranks agree, saves load in peft.

tests/training/distributed.py runs both modes in one launch (process start-up is most of the cost).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from grafting.testing import assert_close
from tests.training.oracle import (
    adapter_tensors,
    assert_adapter_only_checkpoint,
    assert_loads_with_same_logits,
    assert_same_tensors,
    python,
    run_once,
)

# One worker for the module's tests (where xdist honours groups); run_once makes the scenario run once anyway.
pytestmark = pytest.mark.xdist_group("torchrun")


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return run_once(
        tmp_path_factory, "torchrun", lambda folder: python(*launcher, "-m", "tests.training.distributed", str(folder))
    )


@pytest.mark.parametrize("rank", [0, 1])
def test_ranks_ran_without_peft(out: Path, rank: int) -> None:
    blocked = json.loads((out / f"peft{rank}.json").read_text())
    assert blocked == {
        "import_peft": False,
        "transformers_is_peft_available": False,
        "accelerate_is_peft_available": False,
    }


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "trainer_ddp"])
def test_ranks_agree(out: Path, mode: str) -> None:
    folder = out / mode
    assert_same_tensors(load_file(folder / "rank1.safetensors"), load_file(folder / "rank0.safetensors"), exact=True)
    assert_close(
        load_file(folder / "logits1.safetensors")["logits"], load_file(folder / "logits0.safetensors")["logits"]
    )


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_saved_adapter_loads_in_peft_with_the_same_logits(out: Path, mode: str) -> None:
    folder = out / mode
    assert_same_tensors(adapter_tensors(folder / "adapter"), load_file(folder / "rank0.safetensors"), exact=True)
    assert_loads_with_same_logits(folder / "adapter", load_file(folder / "logits0.safetensors")["logits"])


def test_fsdp2_full_state_dict_recipe_saves_the_same_adapter(out: Path) -> None:
    folder = out / "fsdp2"
    from_full = folder / "adapter_from_full_state_dict"
    assert_same_tensors(adapter_tensors(from_full), adapter_tensors(folder / "adapter"), exact=True)
    assert (from_full / "adapter_config.json").read_text() == (folder / "adapter" / "adapter_config.json").read_text()


def test_trainer_under_torchrun_checkpoints_resumes_and_saves_the_adapter(out: Path) -> None:
    folder = out / "trainer_ddp"
    for step in (2, 4):
        assert_adapter_only_checkpoint(folder / "run" / f"checkpoint-{step}")
    start = adapter_tensors(folder / "run" / "checkpoint-2")
    assert_same_tensors(
        adapter_tensors(folder / "resumed" / "checkpoint-4"),
        adapter_tensors(folder / "run" / "checkpoint-4"),
        exact=False,
        changed_from=start,
    )
    assert_same_tensors(adapter_tensors(folder / "final"), load_file(folder / "rank0.safetensors"), exact=True)
    assert_loads_with_same_logits(folder / "final", load_file(folder / "logits0.safetensors")["logits"])
