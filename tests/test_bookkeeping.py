"""Issue 25's rows on the save machinery: grafting touches only what it wrote, a failed save leaves the folder
loadable, locks exclude threads and processes and never follow a link. Each test names its row of the issue."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import grafting
from grafting.errors import AdapterLoadError, FolderLockedError, SaveError
from grafting.io import transaction
from grafting.io.state_dict import get_peft_model_state_dict
from tests.helpers import base_model, files_under, randomize, toy
from tests.helpers import toy_adapted as adapted

pytestmark = pytest.mark.usefixtures("toy_methods")  # the adapters here are TOY_DELTA (tests/toy_methods.py)

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def snapshot(folder: Path) -> dict[str, Any]:
    """Every entry under ``folder`` (links not followed): its kind and, for files, its bytes."""
    found: dict[str, Any] = {}
    for here, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = Path(here) / name
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                found[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                found[rel] = ("dir",)
            else:
                found[rel] = ("file", path.read_bytes())
    return found


def two_adapters(seed: int) -> Any:
    model = adapted("llama", toy("llama", scale=0.2))
    model.add_adapter("other", toy("llama", scale=0.3))
    randomize(model, seed)
    randomize(model, seed + 1, adapter_name="other")
    return model


def saved(model: Any) -> dict[str, dict[str, torch.Tensor]]:
    return {n: get_peft_model_state_dict(model, adapter_name=n) for n in model.peft_config}


def assert_holds(folder: Path, model: Any) -> None:
    """The folder loads (both adapters) as exactly ``model``'s save."""
    loaded = saved(grafting.PeftModel.from_pretrained(base_model("llama"), folder, mixed=True))
    want = saved(model)
    assert sorted(loaded) == sorted(want)
    for name in want:
        assert sorted(loaded[name]) == sorted(want[name])
        assert all(torch.equal(loaded[name][k], want[name][k]) for k in want[name]), name


# -- row 1 ---------------------------------------------------------------------------------------------------
def planted(folder: Path, journal: dict[str, Any]) -> None:
    (folder / transaction.JOURNAL_NAME).write_text(json.dumps(journal))


def test_row01_a_load_never_plays_a_planted_journal(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "id_rsa").write_text("KEY")
    folder = tmp_path / "adapter"
    adapted("llama").save_pretrained(folder)
    os.symlink(secret, folder / ".grafting-staging-x")
    forgeries = [
        {"staging": ".grafting-staging-x", "files": {"id_rsa": "0" * 64}, "remove": []},  # the old format
        {"format": "grafting-commit/2", "staging": ".grafting-staging-x", "files": {"id_rsa": "0" * 64}, "remove": []},
        {"format": "grafting-commit/2", "staging": "../secret", "token": "t", "ino": 1, "files": {}, "remove": []},
        {"format": "grafting-commit/2", "staging": ".grafting-staging-x", "files": {}, "remove": [CONFIG]},
    ]
    fake = folder / (transaction.STAGING_PREFIX + "ab" * 16)  # a real folder with a marker that is not its own
    (fake / "new").mkdir(parents=True)
    (fake / "new" / CONFIG).write_text("{}")
    (fake / "marker.json").write_text(json.dumps({"token": "t", "ino": 1, "dev": fake.stat().st_dev}))
    forgeries.append(
        {"format": "grafting-commit/2", "staging": fake.name, "token": "t", "ino": 1, "files": {}, "remove": [CONFIG]}
    )
    for journal in forgeries:
        planted(folder, journal)
        before = snapshot(folder)
        with pytest.raises(AdapterLoadError, match=r"\.grafting-commit\.json is not a journal grafting can prove"):
            grafting.PeftModel.from_pretrained(base_model("llama"), folder)
        with pytest.raises(AdapterLoadError, match="not a journal grafting can prove"):
            adapted("llama").save_pretrained(folder)
        assert snapshot(folder) == before, journal
        assert (secret / "id_rsa").read_text() == "KEY"


def test_row01_a_journal_is_played_only_with_its_own_staging_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real interrupted commit whose staged file was swapped afterwards is refused, not played."""
    old, new = two_adapters(1), two_adapters(2)
    old.save_pretrained(tmp_path)
    monkeypatch.setattr(transaction, "_play_forward", lambda root, staging, journal: None)  # killed at the commit
    new.save_pretrained(tmp_path)
    monkeypatch.undo()
    (staging,) = [p for p in tmp_path.iterdir() if p.name.startswith(transaction.STAGING_PREFIX)]
    staged = staging / "new" / WEIGHTS
    original = staged.read_bytes()
    staged.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(AdapterLoadError, match=f"its file {WEIGHTS} is missing or changed"):
        grafting.PeftModel.from_pretrained(base_model("llama"), tmp_path)
    staged.write_bytes(original)  # the genuine commit: played forward by the next load
    assert_holds(tmp_path, new)
    assert not any(transaction.is_bookkeeping(p.name) for p in tmp_path.iterdir())


# -- row 2 ---------------------------------------------------------------------------------------------------
def test_row02_loading_a_folder_without_a_lock_never_looks_at_the_parent(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "project").mkdir(parents=True)
    (home / "project" / ".draft.tmp").write_text("draft")
    (home / transaction.LOCK_NAME).write_text("")
    (home / transaction.JOURNAL_NAME).write_text("not a journal")
    adapted("llama").save_pretrained(home / "peft_adapter")
    (home / "peft_adapter" / transaction.LOCK_NAME).unlink(missing_ok=True)  # as PEFT writes it: no lock
    before = snapshot(home)
    grafting.PeftModel.from_pretrained(base_model("llama"), home / "peft_adapter")
    assert snapshot(home) == before


# -- row 3 ---------------------------------------------------------------------------------------------------
def test_row03_a_symlinked_lock_file_is_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    folder = tmp_path / "adapter"
    model = adapted("llama")
    model.save_pretrained(folder)
    os.symlink(victim, folder / transaction.LOCK_NAME)
    grafting.PeftModel.from_pretrained(base_model("llama"), folder)
    model.save_pretrained(folder)
    assert victim.read_text() == "precious"
    assert os.readlink(folder / transaction.LOCK_NAME) == str(victim)


# -- row 4 ---------------------------------------------------------------------------------------------------
def test_row04_a_save_keeps_the_users_tmp_files(tmp_path: Path) -> None:
    mine = {"data/.cache.tmp": "cache", ".notes.tmp": "notes", "other/.x.tmp": "x", ".grafting-tmp-1-a.tmp": "y"}
    for rel, text in mine.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    two_adapters(0).save_pretrained(tmp_path)
    grafting.PeftModel.from_pretrained(base_model("llama"), tmp_path, mixed=True)
    two_adapters(1).save_pretrained(tmp_path)
    assert {rel: (tmp_path / rel).read_text() for rel in mine} == mine


# -- row 5 ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("obstacle", ["README.md is a folder", "other is a file"])
def test_row05_a_save_that_fails_leaves_the_folder_loadable(obstacle: str, tmp_path: Path) -> None:
    if obstacle == "README.md is a folder":
        old = two_adapters(1)
        old.save_pretrained(tmp_path)
        (tmp_path / "README.md").unlink()
        (tmp_path / "README.md").mkdir()
        name = "README.md"
    else:
        old = adapted("llama", toy("llama", scale=0.2))
        randomize(old, 1)
        old.save_pretrained(tmp_path)
        (tmp_path / "other").write_text("mine")
        name = "other"
    before = snapshot(tmp_path)
    with pytest.raises(SaveError, match=rf"{tmp_path / name}.*(in the way|not a folder)"):
        two_adapters(2).save_pretrained(tmp_path)
    assert snapshot(tmp_path) == before
    for _ in range(2):  # every later load works
        assert_holds(tmp_path, old)


def test_row05_a_move_failing_after_the_commit_point_is_rolled_back_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = two_adapters(1), two_adapters(2)
    old.save_pretrained(tmp_path)
    before = snapshot(tmp_path)
    real = os.replace

    def failing(src: Any, dst: Any) -> None:
        if str(dst) == str(tmp_path / "other" / CONFIG) and transaction.STAGING_PREFIX in str(src):
            raise PermissionError(13, "Permission denied", str(dst))
        real(src, dst)

    monkeypatch.setattr(transaction.os, "replace", failing)
    with pytest.raises(SaveError, match="the folder holds the previous save"):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before
    assert_holds(tmp_path, old)
    new.save_pretrained(tmp_path)
    assert_holds(tmp_path, new)


# -- row 6 ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", [".", "..", "elsewhere"])
def test_row06_a_symlinked_adapter_subfolder_is_refused_before_anything_is_written(target: str, tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    (tmp_path / "elsewhere").mkdir()
    first = adapted("llama")
    first.save_pretrained(folder)
    os.symlink(target, folder / "other")
    model = adapted("llama")
    model.add_adapter("other", toy("llama", scale=0.3))
    randomize(model, 4)
    before, outside = snapshot(folder), snapshot(tmp_path / "elsewhere")
    with pytest.raises(SaveError, match=rf"{folder / 'other'}: it is a symlink"):
        model.save_pretrained(folder)
    assert snapshot(folder) == before
    assert snapshot(tmp_path / "elsewhere") == outside == {}


# -- rows 7 and 10: locks ------------------------------------------------------------------------------------
def test_row07_threads_saving_into_one_folder_take_turns(tmp_path: Path) -> None:
    models = [two_adapters(1), two_adapters(2)]
    models[0].save_pretrained(tmp_path)
    errors: list[BaseException] = []
    seen: list[int] = []

    def save(model: Any) -> None:
        try:
            for _ in range(3):
                model.save_pretrained(tmp_path)
        except BaseException as exc:
            errors.append(exc)

    def load() -> None:
        try:
            for _ in range(3):
                loaded = saved(grafting.PeftModel.from_pretrained(base_model("llama"), tmp_path, mixed=True))
                for i, model in enumerate(models):
                    want = saved(model)
                    if all(torch.equal(loaded[n][k], want[n][k]) for n in want for k in want[n]):
                        seen.append(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(m,)) for m in models] + [threading.Thread(target=load)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(seen) == 3  # every load saw one whole save
    assert not any(transaction.is_bookkeeping(p.name) for p in tmp_path.iterdir())


@contextlib.contextmanager
def held_by_another_process(folder: Path) -> Iterator[int]:
    script = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(folder)], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"held"
        yield child.pid
    finally:
        child.kill()
        child.wait()


def test_row10_a_stuck_holder_is_named_after_the_configured_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = adapted("llama")
    model.save_pretrained(tmp_path)
    before = snapshot(tmp_path)
    monkeypatch.setattr(transaction, "LOCK_TIMEOUT", 0.3)
    with held_by_another_process(tmp_path) as pid:
        for call in (
            lambda: model.save_pretrained(tmp_path),
            lambda: grafting.PeftModel.from_pretrained(base_model("llama"), tmp_path),
        ):
            with pytest.raises(FolderLockedError, match=rf"process {pid} \(.*waited 0\.[3-9]"):
                call()
    assert snapshot(tmp_path) == before
    ready, release = threading.Event(), threading.Event()

    def hold() -> None:
        with transaction._locked(str(tmp_path)):
            ready.set()
            release.wait(30)

    holder = threading.Thread(target=hold, name="holder-thread")
    holder.start()
    ready.wait(30)
    try:
        with pytest.raises(FolderLockedError, match=r"thread 'holder-thread' of this process .* waited 0\.3"):
            model.save_pretrained(tmp_path)
    finally:
        release.set()
        holder.join()
    model.save_pretrained(tmp_path)  # released: saves again


@pytest.mark.parametrize("kind", ["folder", "symlink", "unreadable file"])
def test_row10_a_planted_lock_file_is_left_alone(kind: str, tmp_path: Path) -> None:
    """grafting's lock is the folder itself: whatever is named .grafting.lock is the user's and stays as it is."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    folder = tmp_path / "adapter"
    folder.mkdir()
    lock = folder / transaction.LOCK_NAME
    if kind == "folder":
        lock.mkdir()
    elif kind == "symlink":
        os.symlink(victim, lock)
    else:
        lock.write_text("theirs")
        lock.chmod(0)
    model = adapted("llama")
    model.save_pretrained(folder)
    model.save_pretrained(folder)
    grafting.PeftModel.from_pretrained(base_model("llama"), folder)
    assert victim.read_text() == "precious"
    assert os.path.lexists(lock)
    assert {"folder": lock.is_dir(), "symlink": lock.is_symlink(), "unreadable file": lock.is_file()}[kind]


def _in_a_child(work: Any) -> str:
    """Run ``work()`` in a forked child; its outcome ('ok' or the error's class and message)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            work()
            outcome = "ok"
        except BaseException as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        os.write(write_end, outcome.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        outcome = fh.read().decode()
    os.waitpid(pid, 0)
    return outcome


def test_row10_disk_full_is_a_save_error_naming_the_path_and_the_old_save_survives(tmp_path: Path) -> None:
    old, new = two_adapters(1), two_adapters(2)
    old.save_pretrained(tmp_path)

    def save_with_little_room() -> None:
        torch.set_num_threads(1)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        new.save_pretrained(tmp_path)

    outcome = _in_a_child(save_with_little_room)
    assert outcome.startswith("SaveError: cannot save into"), outcome
    assert f"{tmp_path}/{WEIGHTS}" in outcome
    assert_holds(tmp_path, old)
    assert not any(transaction.is_bookkeeping(p.name) for p in tmp_path.iterdir())


def test_row10_no_permission_is_a_save_error_naming_the_path(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    old = adapted("llama")
    old.save_pretrained(folder)
    folder.chmod(0o555)

    def save_without_permission() -> None:
        if os.geteuid() == 0:  # root may write anywhere: save as an unprivileged user instead
            os.setuid(65534)
        adapted("llama").save_pretrained(folder)

    try:
        outcome = _in_a_child(save_without_permission)
    finally:
        folder.chmod(0o755)
    assert outcome.startswith("SaveError: cannot "), outcome
    assert str(folder) in outcome, outcome
    assert "Permission denied" in outcome, outcome
    grafting.PeftModel.from_pretrained(base_model("llama"), folder)


# -- row 12 --------------------------------------------------------------------------------------------------
def test_row12_a_saved_folder_holds_only_peft_s_files_with_modes_from_the_umask(tmp_path: Path) -> None:
    old_mask = os.umask(0o027)
    try:
        two_adapters(0).save_pretrained(tmp_path)
    finally:
        os.umask(old_mask)
    assert files_under(tmp_path) == sorted(["README.md", CONFIG, WEIGHTS, f"other/{CONFIG}", f"other/{WEIGHTS}"])
    assert sorted(os.listdir(tmp_path)) == sorted(["README.md", CONFIG, WEIGHTS, "other"])
    for rel in files_under(tmp_path):
        assert stat.S_IMODE((tmp_path / rel).stat().st_mode) == 0o640, rel
    assert stat.S_IMODE((tmp_path / "other").stat().st_mode) == 0o750


# -- row 7 (forward and merges) -------------------------------------------------------------------------------
def test_row07_a_forward_during_merges_in_another_thread_sees_old_or_new_weights_never_a_mix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The merge (then the unmerge) pauses after its first layer; a forward started then sees no mix
    (unguarded, 147 of 3,789 such forwards counted the adapter twice or not at all)."""
    from grafting.testing import assert_close
    from tests.helpers import logits

    model = adapted("llama", toy("llama", scale=0.4))
    randomize(model, 5, scale=0.5)
    model.eval()
    out, base = logits(model, "llama"), logits(base_model("llama"), "llama")
    (kind,) = {type(layer.adapters["default"]) for _, layer in model.base_model.adapted_layers()}
    halfway = threading.Event()

    def pausing(real: Any) -> Any:
        def change(self: Any, base_layer: Any) -> None:
            real(self, base_layer)
            if not halfway.is_set():
                halfway.set()  # this layer's weight changed, its merged flag and the other layers not yet
                time.sleep(0.5)

        return change

    monkeypatch.setattr(kind, "merge", pausing(kind.merge))
    monkeypatch.setattr(kind, "unmerge", pausing(kind.unmerge))
    for change in (model.merge_adapter, model.unmerge_adapter):
        halfway.clear()
        worker = threading.Thread(target=change)
        worker.start()
        assert halfway.wait(30)
        assert_close(logits(model, "llama"), out, changed_from=base)
        worker.join()
    assert_close(logits(model, "llama"), out, changed_from=base)


def test_row07_a_merge_waits_for_forwards_in_other_threads_and_says_so_when_they_do_not_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from grafting.errors import AdapterStateError
    from grafting.model import weights_guard

    model = adapted("llama")
    inside, release = threading.Event(), threading.Event()

    def slow_forward() -> None:
        with model.base_model.weights_guard.reading():
            inside.set()
            release.wait(30)

    reader = threading.Thread(target=slow_forward)
    reader.start()
    inside.wait(30)
    monkeypatch.setattr(weights_guard, "WRITE_TIMEOUT", 0.2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with pytest.raises(AdapterStateError, match=r"merge_adapter: forwards in other threads kept the model busy"):
            model.merge_adapter()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    finally:
        release.set()
        reader.join()
    model.merge_adapter()  # free again
    assert all(layer.merged for _, layer in model.base_model.adapted_layers())
