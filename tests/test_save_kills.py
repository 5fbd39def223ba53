"""Saves killed at random moments: the folder loads as exactly the old or exactly the new save.

A forked child saves generation after generation of a three-adapter mixed model of toy methods
(tests/toy_methods.py: TOY_DELTA with another ``scale`` each time, a second TOY_DELTA, TOY_OUTPUT) into one folder, or merges with
``grafting merge --out``; the test kills it with SIGKILL at a random moment of a save and checks
that every adapter in the folder is bit for bit the one of the last finished generation or of the
one being saved, all of the same generation, with nothing left over once the next save has run. ``GRAFTING_KILLS`` raises the
number of kills (24 save kills and 6 merge kills by default).
"""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import grafting
from grafting.io.state_dict import get_peft_model_state_dict
from grafting.io.transaction import JOURNAL_NAME, STAGING_PREFIX, reading
from tests.helpers import base_model
from tests.toy_methods import ToyDeltaConfig, ToyOutputConfig

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork"),  # every CI runner has it
    pytest.mark.usefixtures("toy_methods"),  # registered before the fork: the child inherits them
]

KILLS = int(os.environ.get("GRAFTING_KILLS", "24"))
MERGE_KILLS = max(1, KILLS // 4)
NAMES = ("default", "second", "third")


def generation(g: int) -> Any:
    """The mixed model of generation ``g``: the default adapter's config (its scale) changes with ``g``."""
    model = grafting.get_peft_model(
        base_model("llama"), ToyDeltaConfig(scale=0.1 * (1 + g % 3), target_modules=["q_proj", "v_proj"]), mixed=True
    )
    model.add_adapter("second", ToyDeltaConfig(target_modules=["k_proj"]))
    model.add_adapter("third", ToyOutputConfig(target_modules=["o_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(g)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".adapters." in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    return model


def saved_state(model: Any) -> dict[str, dict[str, torch.Tensor]]:
    return {n: get_peft_model_state_dict(model, adapter_name=n) for n in NAMES}


def _own_progress_lock() -> None:
    """Give this forked child its own tqdm lock.

    tqdm's default lock includes a multiprocessing semaphore that a forked child shares with its parent;
    a child killed while it draws a progress bar would leave it held and hang the parent's next bar.
    """
    import tqdm
    import tqdm.auto

    for cls in {tqdm.tqdm, tqdm.auto.tqdm}:
        cls.set_lock(threading.RLock())


def _child(work: Callable[[int], Callable[[], Any]], pipe: int) -> None:
    """Run generations 1, 2, ... forever, reporting each start and end; never returns."""
    try:
        torch.set_num_threads(1)
        _own_progress_lock()
        g = 1
        while True:
            prepared = work(-g)  # build outside the timed window
            os.write(pipe, f"start {g} {time.monotonic()}\n".encode())
            prepared()
            os.write(pipe, f"done {g} {time.monotonic()}\n".encode())
            g += 1
    except BaseException as exc:
        os.write(pipe, f"error {type(exc).__name__} {' '.join(str(exc).split())}\n".encode())
    finally:
        os._exit(1)


def kill_during(work: Callable[[int], Callable[[], Any]], rng: random.Random, *, window: float) -> tuple[int, int]:
    """Fork a child running ``work``; SIGKILL it at a random moment of a save. Returns (last done, last started)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _child(work, write_end)
    os.close(write_end)
    target = rng.randint(1, 3)
    buffer = b""
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while f"start {target} ".encode() not in buffer:
            chunk = pipe.read(4096)
            if not chunk:
                break
            buffer += chunk
        time.sleep(rng.uniform(0, window))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        buffer += pipe.read()
    done = started = 0
    for line in buffer.decode().splitlines():
        assert not line.startswith("error"), f"the saving process failed: {line}"
        event, g, _ = line.split()
        if event == "done":
            done = max(done, int(g))
        else:
            started = max(started, int(g))
    return done, started


@functools.cache
def expected(g: int) -> dict[str, dict[str, torch.Tensor]]:
    """What generation ``g`` saves, adapter by adapter."""
    return saved_state(generation(g))


def _matches(loaded: dict[str, dict[str, torch.Tensor]], want: dict[str, dict[str, torch.Tensor]]) -> bool:
    for name in NAMES:
        a, b = loaded[name], want[name]
        if sorted(a) != sorted(b) or not all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a):
            return False
    return True


def _leftovers(folder: Path) -> list[str]:
    return [
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.name.startswith(STAGING_PREFIX) or p.name == JOURNAL_NAME or p.name.endswith(".tmp")
    ]


def test_saves_killed_at_random_moments_leave_the_old_or_the_new_save(tmp_path: Path, record_property: Any) -> None:
    rng = random.Random(20261202)
    folder = tmp_path / "save"

    def work(g: int) -> Callable[[], Any]:  # built before the timed save: the model of generation -g
        model = generation(-g)
        return lambda: model.save_pretrained(folder)

    generation(0).save_pretrained(folder)
    t0 = time.monotonic()
    generation(1).save_pretrained(tmp_path / "timing")
    window = (time.monotonic() - t0) * 1.5
    outcomes = {"old": 0, "new": 0}
    for kill in range(KILLS):
        done, started = kill_during(work, rng, window=window)
        loaded_model = grafting.PeftModel.from_pretrained(base_model("llama"), folder, mixed=True)
        loaded = saved_state(loaded_model)
        candidates = {"old": done, "new": started} if started > done else {"old": done}
        verdict = next((k for k, g in candidates.items() if _matches(loaded, expected(g))), None)
        assert verdict is not None, f"kill {kill}: the folder holds neither generation {done} nor {started}"
        outcomes[verdict] += 1
        generation(0).save_pretrained(folder)  # the next kill starts from generation 0 again
        # a load writes nothing but a committed save's moves; the next save removes what a killed one staged
        assert not _leftovers(folder), f"kill {kill}: left {_leftovers(folder)}"
    record_property("save_kills", outcomes)
    sys.stdout.write(f"\nsave kills: {KILLS} ({outcomes['old']} old, {outcomes['new']} new), 0 mixed or corrupt\n")
    assert outcomes["old"] + outcomes["new"] == KILLS


def test_merges_killed_at_random_moments_leave_the_old_or_the_new_model(tmp_path: Path, record_property: Any) -> None:
    from transformers import AutoModelForCausalLM

    from grafting.cli import main

    base = tmp_path / "base"
    base_model("llama").save_pretrained(base)
    adapters = {}
    for g in range(4):
        adapters[g] = tmp_path / f"adapter{g}"
        model = grafting.get_peft_model(base_model("llama"), ToyDeltaConfig(target_modules=["q_proj"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "toy_" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(g)))
        model.save_pretrained(adapters[g])
    wants = {}
    for g in range(4):
        assert (
            main(["merge", "--base", str(base), "--adapter", str(adapters[g]), "--out", str(tmp_path / f"m{g}")]) == 0
        )
        wants[g] = AutoModelForCausalLM.from_pretrained(tmp_path / f"m{g}").state_dict()
    out = tmp_path / "out"

    def merge(g: int) -> None:
        args = ["merge", "--base", str(base), "--adapter", str(adapters[g % 4]), "--out", str(out), "--force"]
        if main(args) != 0:
            raise RuntimeError(f"grafting {' '.join(args)} failed")

    def work(g: int) -> Callable[[], Any]:
        return lambda: merge(-g)

    assert main(["merge", "--base", str(base), "--adapter", str(adapters[0]), "--out", str(out)]) == 0
    t0 = time.monotonic()
    work(-1)()
    window = (time.monotonic() - t0) * 1.2
    merge(0)
    outcomes = {"old": 0, "new": 0}
    rng = random.Random(7)
    for kill in range(MERGE_KILLS):
        done, started = kill_during(work, rng, window=window)
        with reading(out):  # what the next grafting call does first: finish or drop the interrupted save
            state = AutoModelForCausalLM.from_pretrained(out).state_dict()
        candidates = {"old": done % 4, "new": started % 4} if started > done else {"old": done % 4}
        verdict = next(
            (k for k, g in candidates.items() if all(torch.allclose(state[n], wants[g][n], atol=1e-6) for n in state)),
            None,
        )
        diffs = {g: max(float((state[n] - w[n]).abs().max()) for n in state) for g, w in wants.items()}
        assert verdict is not None, f"merge kill {kill}: --out holds neither generation {done} nor {started}: {diffs}"
        outcomes[verdict] += 1
        assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
        merge(0)
        assert not _leftovers(out), f"merge kill {kill}: left {_leftovers(out)}"
    record_property("merge_kills", outcomes)
    sys.stdout.write(f"\nmerge kills: {MERGE_KILLS} ({outcomes['old']} old, {outcomes['new']} new), 0 mixed\n")


def test_concurrent_savers_and_loaders_see_whole_saves(tmp_path: Path) -> None:
    """Two processes save different generations into one folder while this one loads it: every load is whole."""
    folder = tmp_path / "save"
    generation(0).save_pretrained(folder)
    pids = []
    for g in (1, 2):
        model = generation(g)
        pid = os.fork()
        if pid == 0:
            try:
                torch.set_num_threads(1)
                _own_progress_lock()
                for _ in range(6):
                    model.save_pretrained(folder)
            finally:
                os._exit(0)
        pids.append(pid)
    seen: list[int] = []
    alive = set(pids)
    while (alive or len(seen) < 3) and len(seen) < 200:
        loaded = saved_state(grafting.PeftModel.from_pretrained(base_model("llama"), folder, mixed=True))
        matches = [g for g in (0, 1, 2) if _matches(loaded, expected(g))]
        assert matches, "a load during concurrent saves got none of the saved generations"
        seen.append(matches[0])
        for pid in list(alive):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                alive.discard(pid)
    for pid in alive:
        os.waitpid(pid, 0)
    final = saved_state(grafting.PeftModel.from_pretrained(base_model("llama"), folder, mixed=True))
    assert _matches(final, expected(1)) or _matches(final, expected(2))
    assert not _leftovers(folder)
    sys.stdout.write(f"\nconcurrent saves: 12 saves by 2 processes, {len(seen)} whole loads meanwhile\n")
