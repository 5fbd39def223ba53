"""All-or-nothing saves into a folder: stage, commit with a journal, recover, under a lock.

A save writes every file into a staging folder inside the target folder, then
commits: it writes a journal naming the staged files and their SHA-256 (one
atomic rename), moves each file into place, and deletes the journal. A reader
or the next writer, under the folder's lock, first *recovers*: a journal left
by a killed commit is played forward (the commit happened), any staging folder
without a journal is deleted (the save never happened). So after a kill at any
moment the folder holds exactly the old or exactly the new save, and no
temporary file stays behind. The layout itself is unchanged (PEFT's).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from filelock import FileLock, Timeout

from grafting.errors import AdapterLoadError, FolderLockedError

LOCK_NAME = ".grafting.lock"
JOURNAL_NAME = ".grafting-commit.json"
STAGING_PREFIX = ".grafting-staging-"
#: Seconds a save or load waits for another process's save of the same folder.
LOCK_TIMEOUT = 600.0
#: Temporary files of single-file atomic writes (``.adapter_model.safetensors.x1y2.tmp``).
_STRAY = re.compile(r"^\..+\.tmp$")

_locks: dict[tuple[int, str], FileLock] = {}
_locks_guard = threading.Lock()


def _lock_for(root: str) -> FileLock:
    """One FileLock object per folder and process, so nested uses re-enter instead of deadlocking."""
    key = (os.getpid(), root)  # a forked child takes its own
    with _locks_guard:
        lock = _locks.get(key)
        if lock is None:
            lock = _locks[key] = FileLock(os.path.join(root, LOCK_NAME), timeout=LOCK_TIMEOUT, thread_local=False)
        return lock


@contextlib.contextmanager
def _locked(root: str) -> Iterator[None]:
    try:
        with _lock_for(root):
            yield
    except Timeout:
        raise FolderLockedError(
            f"{root} is being saved by another process (waited {LOCK_TIMEOUT:.0f} s for {LOCK_NAME})"
        ) from None


def inside(root: str, path: str) -> str:
    """``path`` if it resolves to a place inside ``root``, else an error: nothing is written outside the folder."""
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise AdapterLoadError(f"refusing to write {path}: it is outside the save folder {root}")
    return path


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # not every platform opens folders
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _staged_files(staging: str) -> list[str]:
    found = []
    for folder, _, names in os.walk(staging):
        found += [os.path.relpath(os.path.join(folder, n), staging) for n in names]
    return sorted(found)


@contextlib.contextmanager
def save_transaction(root: str | os.PathLike[str], *, remove: Iterable[str] = ()) -> Iterator[str]:
    """Yield a staging folder; when the block ends without error, its files replace those in ``root`` at once.

    ``remove`` names files (relative to ``root``) the new save makes obsolete, deleted in the same commit
    (a ``.bin`` beside a new ``.safetensors``). On an error nothing in ``root`` changes.
    """
    root = os.path.abspath(os.fspath(root))
    os.makedirs(root, exist_ok=True)
    with _locked(root):
        recover(root)
        staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root)
        try:
            yield staging
            _commit(root, staging, sorted(set(remove)))
        finally:
            if not os.path.exists(os.path.join(root, JOURNAL_NAME)):  # committed saves are finished by recover()
                shutil.rmtree(staging, ignore_errors=True)


def _commit(root: str, staging: str, remove: list[str]) -> None:
    files = _staged_files(staging)
    for rel in files + remove:
        inside(root, os.path.join(root, rel))
    for rel in files:
        with open(os.path.join(staging, rel), "rb") as fh:
            os.fsync(fh.fileno())
    journal = {
        "staging": os.path.basename(staging),
        "files": {rel: _sha256(os.path.join(staging, rel)) for rel in files},
        "remove": [rel for rel in remove if rel not in files],
    }
    pending = os.path.join(staging, ".journal")
    with open(pending, "w", encoding="utf-8") as fh:
        json.dump(journal, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(pending, os.path.join(root, JOURNAL_NAME))  # the commit point
    _fsync_dir(root)
    _play_forward(root, journal)


def _play_forward(root: str, journal: dict[str, Any]) -> None:
    """Move a committed save's staged files into place (again, after a kill) and close the journal."""
    staging = os.path.join(root, journal["staging"])
    touched = {root}
    for rel, digest in journal["files"].items():
        src, dst = os.path.join(staging, rel), os.path.join(root, rel)
        if os.path.exists(src):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(src, dst)
            touched.add(os.path.dirname(dst))
        elif not os.path.isfile(dst) or _sha256(dst) != digest:
            raise AdapterLoadError(f"{root}: the committed file {rel} is missing or changed; save again")
    for rel in journal["remove"]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(root, rel))
    for folder in touched:
        _fsync_dir(folder)
    os.unlink(os.path.join(root, JOURNAL_NAME))
    _fsync_dir(root)
    shutil.rmtree(staging, ignore_errors=True)


def recover(root: str) -> None:
    """Finish a committed save that was interrupted, and delete what uncommitted ones left (call under the lock)."""
    journal_path = os.path.join(root, JOURNAL_NAME)
    if os.path.isfile(journal_path):
        try:
            with open(journal_path, encoding="utf-8") as fh:
                journal = json.load(fh)
            staging = journal["staging"]
            files, remove = journal["files"], journal["remove"]
            valid = (
                isinstance(staging, str)
                and staging.startswith(STAGING_PREFIX)
                and os.sep not in staging
                and isinstance(files, dict)
                and isinstance(remove, list)
            )
        except (OSError, ValueError, KeyError, TypeError):
            valid = False
        if not valid:
            raise AdapterLoadError(f"{journal_path} is not a journal grafting wrote; remove it to use the folder")
        for rel in [*files, *remove]:
            inside(root, os.path.join(root, rel))
        _play_forward(root, journal)
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        if entry.startswith(STAGING_PREFIX) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
    for folder in [root, *(os.path.join(root, e) for e in os.listdir(root))]:
        if os.path.isdir(folder) and not os.path.islink(folder):
            for entry in os.listdir(folder):
                if _STRAY.match(entry) and os.path.isfile(os.path.join(folder, entry)):
                    os.unlink(os.path.join(folder, entry))


def transaction_root(folder: str) -> str:
    """The folder whose lock guards ``folder``: its parent when a save there holds it as an adapter subfolder."""
    parent = os.path.dirname(os.path.abspath(folder))
    for candidate in (folder, parent):
        if os.path.exists(os.path.join(candidate, LOCK_NAME)) or os.path.exists(os.path.join(candidate, JOURNAL_NAME)):
            return os.path.abspath(candidate)
    return os.path.abspath(folder)


@contextlib.contextmanager
def reading(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the lock of ``folder``'s save while reading it, after recovering an interrupted save.

    Only a folder grafting has saved into holds a lock file; others (PEFT's, a read-only cache) are read
    without one, and a load creates no file there. A folder grafting cannot lock is read without the
    lock, unless an interrupted save must be finished first.
    """
    root = transaction_root(os.fspath(folder))
    journal = os.path.exists(os.path.join(root, JOURNAL_NAME))
    if not os.path.exists(os.path.join(root, LOCK_NAME)) and not journal:
        yield
        return
    guard = _locked(root)
    try:
        guard.__enter__()
    except FolderLockedError:
        raise
    except OSError:
        if journal:
            raise AdapterLoadError(f"{root} holds an unfinished save and is not writable to finish it") from None
        yield
        return
    try:
        recover(root)
        yield
    finally:
        guard.__exit__(None, None, None)


def is_bookkeeping(name: str) -> bool:
    """Whether a file name is one of this module's (the lock), not part of any save."""
    return name in (LOCK_NAME, JOURNAL_NAME) or name.startswith(STAGING_PREFIX)
