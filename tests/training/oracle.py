"""Checks of saved training artifacts, run in the test process (peft importable there, as the oracle)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from grafting.testing import assert_close, assert_identical
from tests.training.common import base_model, probe_logits

ROOT = Path(__file__).resolve().parents[2]
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}
TRAINER_STATE = {"optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin"}
FULL_MODEL_FILES = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}


def run(command: list[str], timeout: int = 600) -> None:
    """Run ``command`` from the repository root on one thread; fail with its output if it fails."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"{command} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}")


def run_once(tmp_path_factory: Any, name: str, command: Callable[[Path], list[str]]) -> Path:
    """Run ``command(folder)`` once per test run and return ``folder``; later calls wait for it and reuse it.

    pytest-xdist's ``xdist_group`` does not keep a module's tests on one worker here (pytest 9.2 with
    xdist 3.8: the group suffix never reaches the node ids), so each worker sets the module fixture up:
    a lock in the run's shared temporary folder makes the first one run the scenario and the others
    wait for its result (its failure too) instead of running it again, in parallel.
    """
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this run's folder, shared by its workers
    folder = root / name
    with FileLock(str(root / f"{name}.lock")):
        failed = root / f"{name}.failed"
        if failed.exists():
            raise AssertionError(failed.read_text())
        if not (folder / "DONE").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            try:
                run(command(folder))
            except Exception as exc:  # a failure or a timeout: the waiting workers report it too
                failed.write_text(f"{type(exc).__name__}: {exc}")
                raise
            (folder / "DONE").touch()
    return folder


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def result(folder: Path) -> dict[str, Any]:
    """A scenario's result.json; a scenario that raised fails the test with its traceback."""
    data = json.loads((folder / "result.json").read_text())
    assert data["ok"], data["error"]
    return data


def recorded_logits(folder: Path) -> torch.Tensor:
    return load_file(folder / "probe_logits.safetensors")["logits"]


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def base_logits() -> torch.Tensor:
    return probe_logits(base_model())


def logits_in_peft(folder: Path) -> torch.Tensor:
    """The probe logits of the saved adapter loaded by peft onto a fresh base model."""
    import peft

    return probe_logits(peft.PeftModel.from_pretrained(base_model(), str(folder)))


def logits_in_grafting(folder: Path) -> torch.Tensor:
    import grafting

    return probe_logits(grafting.PeftModel.from_pretrained(base_model(), str(folder)))


def assert_loads_with_same_logits(folder: Path, expected: torch.Tensor) -> None:
    """peft and grafting both load ``folder`` and reproduce ``expected``, which the training moved off the base."""
    assert_close(logits_in_peft(folder), expected, changed_from=base_logits(), msg="peft's logits")
    assert_close(logits_in_grafting(folder), expected, changed_from=base_logits(), msg="grafting's logits")


def assert_adapter_only_checkpoint(folder: Path) -> None:
    """A Trainer checkpoint: the adapter in PEFT's format plus the trainer's state, never the whole model."""
    files = set(os.listdir(folder))
    assert files >= ADAPTER_FILES | TRAINER_STATE, sorted(files)
    assert any(name.startswith("rng_state") for name in files), sorted(files)  # rng_state.pth, or one per rank
    assert not files & FULL_MODEL_FILES, sorted(files)
    assert (folder / "adapter_model.safetensors").stat().st_size < 10_000  # r=4 on q/v of the tiny model: ~3 KB


def assert_same_tensors(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *, exact: bool, changed_from: Any = None
) -> None:
    """Bitwise for copied tensors; up to float rounding for tensors two runs computed (``changed_from``: see assert_close)."""
    if exact:
        assert_identical(actual, expected)
    else:
        assert_close(actual, expected, changed_from=changed_from)
