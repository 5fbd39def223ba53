"""All-or-nothing saves into a folder: stage, commit with a journal, recover, under a lock.

A save writes every file into its own staging folder inside the target folder
(``.grafting-staging-<random>/new/...``), then commits: it writes a journal
naming the staged files and their SHA-256 (one atomic rename: the commit
point), moves each file into place (hard-linking the file it replaces into the
staging folder first, so the move can be undone), and deletes the journal and
the staging folder. If a move fails the commit is rolled back at once; if the
process is killed, the next load or save of that folder plays the journal
forward. So the folder holds exactly the old or exactly the new save.

Grafting touches only what it wrote:

- bookkeeping never follows a symlink: the staging folder and the journal are
  checked with ``lstat``; files are moved with ``rename``, which replaces a
  link instead of writing through it; the folder's own subfolders must be real
  directories;
- a journal is played only when grafting can prove it wrote it: it is a
  regular file of this user, and names a staging folder that is a real
  directory of this user inside the folder, whose inode and random token (kept
  in a marker file inside it) match the journal's; every staged file's digest
  is checked before anything moves. Any other journal is refused with an error
  naming it, and nothing is changed;
- a load writes nothing unless such a journal is there to finish;
- a save deletes only its own staging folder, and the staging folders of
  killed saves that carry grafting's marker bound to their own inode, never any
  other file (a user's ``.*.tmp`` included), and never outside the folder.

Readers that bypass grafting (PEFT) see the staging folder as a hidden entry
whose name holds a ``.`` (which PEFT cannot take as an adapter name) and which
holds no ``adapter_config.json`` at its top (the staged tree lies one level
down), so it is never listed as an adapter; they do not take the lock, so
during the moves of a commit they may read one adapter's new weights beside
its old config (grafting's loads refuse that pair by its digest).

The lock is the folder itself (``flock`` on the directory; no lock file is
created), plus one re-entrant lock per folder for the threads of a process.
Saves take it exclusively; loads take it too, without writing anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from grafting.errors import AdapterLoadError, FolderLockedError, GraftingError, SaveError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: threads of one process are still serialized
    fcntl = None  # type: ignore[assignment]

#: A lock file of grafting < 0.2 (the lock is now the folder itself); never created, never read.
LOCK_NAME = ".grafting.lock"
JOURNAL_NAME = ".grafting-commit.json"
STAGING_PREFIX = ".grafting-staging-"
#: Seconds a save or load waits for another save of the same folder (``GRAFTING_LOCK_TIMEOUT``).
LOCK_TIMEOUT = float(os.environ.get("GRAFTING_LOCK_TIMEOUT", "600"))
_STAGING = re.compile(r"^\.grafting-staging-[0-9a-f]{32}$")
_MARKER = "marker.json"
_NEW, _OLD = "new", "old"
_FORMAT = "grafting-commit/2"
_MAX_JOURNAL = 16 << 20
_uid = getattr(os, "geteuid", lambda: -1)


# -- the lock -----------------------------------------------------------------------------------------------
class _FolderLock:
    """One folder's lock in this process: a re-entrant thread lock around a ``flock`` of the directory."""

    def __init__(self) -> None:
        self.thread_lock = threading.RLock()
        self.depth = 0
        self.fd: int | None = None
        self.holder = ""
        self.since = 0.0


_locks: dict[tuple[int, int, int], _FolderLock] = {}
_locks_guard = threading.Lock()


def _lock_for(root: str) -> _FolderLock:
    st = os.stat(root)
    key = (os.getpid(), st.st_dev, st.st_ino)  # a forked child takes its own; two paths of one folder share
    with _locks_guard:
        return _locks.setdefault(key, _FolderLock())


def _holders(root: str) -> str:
    """Who holds the folder's ``flock``, as far as /proc/locks tells (Linux), else ''."""
    try:
        st = os.stat(root)
        with open("/proc/locks", encoding="ascii") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return ""
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = sorted({p[4] for p in (line.split() for line in lines) if len(p) > 5 and p[5] == wanted and p[1] == "FLOCK"})
    names = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = " ".join(fh.read().replace(b"\0", b" ").decode(errors="replace").split())[:120]
        except OSError:
            cmd = "?"
        names.append(f"process {pid} ({cmd})")
    return ", ".join(names)


@contextlib.contextmanager
def _locked(root: str, *, timeout: float | None = None, required: bool = True) -> Iterator[None]:
    """Hold ``root``'s lock against other threads and processes; FolderLockedError after ``timeout`` seconds.

    ``required=False`` (loads): a folder that cannot be opened for locking is read without the lock.
    """
    wait = LOCK_TIMEOUT if timeout is None else timeout
    start = time.monotonic()
    lock = _lock_for(root)
    if not lock.thread_lock.acquire(timeout=wait):
        raise FolderLockedError(
            f"{root} is being saved by thread {lock.holder!r} of this process (for"
            f" {time.monotonic() - lock.since:.1f} s); waited {wait:.1f} s (GRAFTING_LOCK_TIMEOUT)"
        )
    try:
        if lock.depth == 0 and fcntl is not None:
            try:
                fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            except OSError as exc:
                if required:
                    raise SaveError(f"cannot lock {root}: {exc.strerror}") from None
                fd = -1
            if fd >= 0:
                _flock(fd, root, wait - (time.monotonic() - start))
                lock.fd = fd
        if lock.depth == 0:
            lock.holder, lock.since = threading.current_thread().name, time.monotonic()
        lock.depth += 1
        try:
            yield
        finally:
            lock.depth -= 1
            if lock.depth == 0 and lock.fd is not None:
                os.close(lock.fd)  # closing the only descriptor releases the flock
                lock.fd = None
    finally:
        lock.thread_lock.release()


def _flock(fd: int, root: str, wait: float) -> None:
    start = time.monotonic()
    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        except OSError:  # a file system without flock: threads of this process are still serialized
            return
        if time.monotonic() - start >= wait:
            who = _holders(root) or "another process"
            os.close(fd)
            raise FolderLockedError(
                f"{root} is being saved by {who}; waited {time.monotonic() - start:.1f} s for it"
                " (set GRAFTING_LOCK_TIMEOUT or grafting.io.transaction.LOCK_TIMEOUT to wait longer)"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


# -- paths --------------------------------------------------------------------------------------------------
def inside(root: str, path: str) -> str:
    """``path`` if it resolves to a place inside ``root``, else an error: nothing is written outside the folder."""
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise AdapterLoadError(f"refusing to write {path}: it is outside the save folder {root}")
    return path


def _relative_ok(rel: Any) -> bool:
    """A plain relative path of files a save writes: no '..', no absolute path, no bookkeeping name."""
    if not isinstance(rel, str) or not rel or "\0" in rel or "\\" in rel or os.path.isabs(rel):
        return False
    parts = rel.split("/")
    return all(p not in ("", ".", "..") and not is_bookkeeping(p) for p in parts)


def real_folders(root: str, rel_dir: str) -> None:
    """SaveError unless every component of ``rel_dir`` under ``root`` is a real directory or absent."""
    path = root
    for part in [p for p in rel_dir.split("/") if p]:
        path = os.path.join(path, part)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a folder"
            raise SaveError(f"cannot save into {path}: it is {kind}; an adapter subfolder must be a real folder")


def _make_folders(root: str, rel_dir: str, made: list[str]) -> None:
    """Create the missing folders of ``rel_dir`` under ``root``, one component at a time, never through a link."""
    real_folders(root, rel_dir)
    path = root
    for part in [p for p in rel_dir.split("/") if p]:
        path = os.path.join(path, part)
        if not os.path.lexists(path):
            os.mkdir(path)
            made.append(path)
    real_folders(root, rel_dir)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as fh:
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


def _files_of(folder: str) -> list[str]:
    found = []
    for here, dirs, names in os.walk(folder):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(here, d))]:
            found.append(os.path.relpath(os.path.join(here, name), folder).replace(os.sep, "/"))
    return sorted(found)


# -- staging ------------------------------------------------------------------------------------------------
def _new_staging(root: str) -> tuple[str, dict[str, Any]]:
    """Create this save's staging folder (an unguessable name) and its marker: (path, binding)."""
    path = os.path.join(root, STAGING_PREFIX + secrets.token_hex(16))
    os.mkdir(path, 0o700)
    st = os.lstat(path)
    binding = {"token": secrets.token_hex(32), "ino": st.st_ino, "dev": st.st_dev}
    fd = os.open(os.path.join(path, _MARKER), os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(binding, fh)
    os.mkdir(os.path.join(path, _NEW))
    os.mkdir(os.path.join(path, _OLD))
    return path, binding


def _read_small_json(path: str) -> Any:
    """The JSON of a regular file of this user (never through a symlink), or ValueError saying why not."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise ValueError(f"cannot open it ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("it is not a regular file")
        if _uid() >= 0 and st.st_uid != _uid():
            raise ValueError("it belongs to another user")
        if st.st_size > _MAX_JOURNAL:
            raise ValueError("it is too large")
        return json.loads(fh.read())


def _proven_staging(root: str, name: str, binding: dict[str, Any]) -> str:
    """The staging folder ``name`` if it is one grafting made with ``binding`` (token, inode), else ValueError."""
    if not isinstance(name, str) or not _STAGING.match(name):
        raise ValueError(f"its staging folder {name!r} is not a name grafting gives")
    path = os.path.join(root, name)
    try:
        st = os.lstat(path)
    except OSError:
        raise ValueError(f"its staging folder {name} is missing") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"its staging folder {name} is not a real folder")
    if _uid() >= 0 and st.st_uid != _uid():
        raise ValueError(f"its staging folder {name} belongs to another user")
    marker = _read_small_json(os.path.join(path, _MARKER))
    token = binding.get("token")
    if (
        not isinstance(marker, dict)
        or not isinstance(token, str)
        or not hmac.compare_digest(str(marker.get("token")), token)
        or marker.get("ino") != st.st_ino
        or binding.get("ino") != st.st_ino
        or marker.get("dev") != st.st_dev
        or st.st_dev != os.lstat(root).st_dev
    ):
        raise ValueError(f"its staging folder {name} is not the one it was written with")
    return path


def _remove_stale_staging(root: str) -> None:
    """Delete staging folders that killed saves left, each only if its marker proves grafting made it there."""
    for entry in os.listdir(root):
        if _STAGING.match(entry):
            path = os.path.join(root, entry)
            try:
                marker = _read_small_json(os.path.join(path, _MARKER))
                _proven_staging(root, entry, marker if isinstance(marker, dict) else {})
            except (ValueError, OSError):
                with contextlib.suppress(OSError):  # killed while its marker was written: nothing else in it
                    if _uid() < 0 or os.lstat(path).st_uid == _uid():
                        if os.listdir(path) == [_MARKER] and stat.S_ISREG(
                            os.lstat(os.path.join(path, _MARKER)).st_mode
                        ):
                            os.unlink(os.path.join(path, _MARKER))
                        os.rmdir(path)  # only if empty
                continue  # else not provably ours: left alone
            _remove_staging(path)


def _remove_staging(path: str) -> None:
    """Delete a staging folder so that a kill at any moment leaves it provable by its marker, or empty."""
    for part in (_NEW, _OLD, "journal.json"):
        target = os.path.join(path, part)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(path, _MARKER))
        os.rmdir(path)


# -- commit, roll forward, roll back ------------------------------------------------------------------------
@contextlib.contextmanager
def save_transaction(root: str | os.PathLike[str], *, remove: Iterable[str] = ()) -> Iterator[str]:
    """Yield a staging folder; when the block ends without error, its files replace those in ``root`` at once.

    ``remove`` names files (relative to ``root``) the new save makes obsolete, deleted in the same commit
    (a ``.bin`` beside a new ``.safetensors``). On an error nothing in ``root`` changes; an OSError of the
    block or of the commit (disk full, no permission) becomes a SaveError naming the path.
    """
    root = os.path.abspath(os.fspath(root))
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as exc:
        raise SaveError(f"cannot create the save folder {root}: {exc.strerror}") from None
    with _locked(root):
        recover(root)
        _remove_stale_staging(root)
        try:
            staging, binding = _new_staging(root)
        except OSError as exc:
            raise SaveError(f"cannot save into {root}: {exc.strerror} ({exc.filename})") from None
        new = os.path.join(staging, _NEW)
        try:
            try:
                yield new
            except OSError as exc:
                raise SaveError(f"cannot save into {root}: {_public(str(exc), new, root)}") from None
            _commit(root, staging, binding, [r.replace(os.sep, "/") for r in sorted(set(remove))])
        finally:
            if not os.path.lexists(os.path.join(root, JOURNAL_NAME)):  # else the next load finishes the commit
                _remove_staging(staging)


def _public(message: str, new: str, root: str) -> str:
    return message.replace(new, root)


def _commit(root: str, staging: str, binding: dict[str, Any], remove: list[str]) -> None:
    """Write the journal (the commit point) and play it; roll back at once if a move fails."""
    new = os.path.join(staging, _NEW)
    files = _files_of(new)
    for rel in files + remove:
        if not _relative_ok(rel):
            raise SaveError(f"refusing to save {rel!r} into {root}: not a plain path inside the folder")
        inside(root, os.path.join(root, rel))
    for rel in files:
        _check_destination(root, rel)
        src = os.path.join(new, rel)
        if not stat.S_ISREG(os.lstat(src).st_mode):
            raise SaveError(f"refusing to save {os.path.join(root, rel)}: the staged entry is not a regular file")
    made: list[str] = []
    locks = contextlib.ExitStack()
    with locks:
        try:
            for sub in sorted({rel.rsplit("/", 1)[0] for rel in files if "/" in rel}):
                _make_folders(root, sub, made)
                if "/" not in sub:  # an adapter subfolder: readers of it lock it
                    locks.enter_context(_locked(os.path.join(root, sub)))
            for rel in files:
                with open(os.path.join(new, rel), "rb") as fh:
                    os.fsync(fh.fileno())
            journal = {
                "format": _FORMAT,
                "staging": os.path.basename(staging),
                "token": binding["token"],
                "ino": binding["ino"],
                "files": {rel: _sha256(os.path.join(new, rel)) for rel in files},
                "remove": [rel for rel in remove if rel not in files],
            }
            pending = os.path.join(staging, "journal.json")
            with open(pending, "w", encoding="utf-8") as fh:
                json.dump(journal, fh)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            _remove_made(made)
            raise SaveError(f"cannot save into {root}: {_public(str(exc), new, root)}") from None
        except GraftingError:
            _remove_made(made)
            raise
        os.replace(pending, os.path.join(root, JOURNAL_NAME))  # the commit point
        _fsync_dir(root)
        try:
            _play_forward(root, staging, journal)
        except OSError as exc:
            where = _public(str(exc), new, root)
            try:
                _roll_back(root, staging, journal)
            except OSError as again:
                raise SaveError(
                    f"saving into {root} failed ({where}) and could not be undone ({again}); the next load of"
                    f" {root} finishes it from {JOURNAL_NAME}"
                ) from None
            _remove_made(made)
            raise SaveError(f"saving into {root} failed: {where}; the folder holds the previous save") from None


def _remove_made(made: list[str]) -> None:
    for path in reversed(made):
        with contextlib.suppress(OSError):
            os.rmdir(path)  # only if still empty


def _check_destination(root: str, rel: str) -> None:
    """SaveError unless ``rel`` can be replaced by a file: absent, a file or a link (replaced, not followed)."""
    real_folders(root, os.path.dirname(rel))
    path = os.path.join(root, rel)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(os.lstat(path).st_mode):
            raise SaveError(f"cannot save {path}: a folder of that name is in the way")


def _play_forward(root: str, staging: str, journal: dict[str, Any]) -> None:
    """Move a committed save's staged files into place (again, after a kill) and close the journal."""
    new, old = os.path.join(staging, _NEW), os.path.join(staging, _OLD)
    touched = {root}
    for rel in journal["files"]:
        src, dst, bak = os.path.join(new, rel), os.path.join(root, rel), os.path.join(old, rel)
        if not os.path.lexists(src):
            continue  # moved before a kill
        _make_folders(root, os.path.dirname(rel), [])
        if os.path.lexists(dst) and not os.path.lexists(bak):
            os.makedirs(os.path.dirname(bak), exist_ok=True)
            try:
                os.link(dst, bak, follow_symlinks=False)  # the old file stays in place until replaced
            except OSError:
                os.replace(dst, bak)
        os.replace(src, dst)
        touched.add(os.path.dirname(dst))
    for rel in journal["remove"]:
        path, bak = os.path.join(root, rel), os.path.join(old, rel)
        if os.path.lexists(path):
            os.makedirs(os.path.dirname(bak), exist_ok=True)
            os.replace(path, bak)
    for folder in touched:
        _fsync_dir(folder)
    os.unlink(os.path.join(root, JOURNAL_NAME))
    _fsync_dir(root)
    _remove_staging(staging)


def _roll_back(root: str, staging: str, journal: dict[str, Any]) -> None:
    """Undo a partly played commit: put back every replaced and removed file, then drop the journal."""
    new, old = os.path.join(staging, _NEW), os.path.join(staging, _OLD)
    for rel in journal["remove"]:
        if os.path.lexists(os.path.join(old, rel)):
            os.replace(os.path.join(old, rel), os.path.join(root, rel))
    for rel in reversed(list(journal["files"])):
        src, dst, bak = os.path.join(new, rel), os.path.join(root, rel), os.path.join(old, rel)
        if os.path.lexists(src) and os.path.lexists(bak) and os.path.samestat(os.lstat(bak), os.lstat(dst)):
            os.unlink(bak)  # linked, never replaced: the old file is still in place
            continue
        if not os.path.lexists(src) and os.path.lexists(dst):
            os.replace(dst, src)
        if os.path.lexists(bak):
            os.replace(bak, dst)
    os.unlink(os.path.join(root, JOURNAL_NAME))
    _fsync_dir(root)


def _proven_journal(root: str) -> tuple[str, dict[str, Any]] | None:
    """The journal in ``root`` with its staging folder, if there is one; AdapterLoadError if it is not provably ours."""
    path = os.path.join(root, JOURNAL_NAME)
    if not os.path.lexists(path):
        return None
    try:
        journal = _read_small_json(path)
        if not isinstance(journal, dict) or journal.get("format") != _FORMAT:
            raise ValueError("it is not in grafting's journal format")
        files, remove = journal.get("files"), journal.get("remove")
        if not isinstance(files, dict) or not isinstance(remove, list):
            raise ValueError("it does not list files")
        bad = [rel for rel in [*files, *remove] if not _relative_ok(rel)]
        if bad or not all(isinstance(d, str) and re.fullmatch(r"[0-9a-f]{64}", d) for d in files.values()):
            raise ValueError(f"it names paths or digests grafting never writes ({bad[:3]})")
        staging = _proven_staging(root, str(journal.get("staging")), journal)
        new = os.path.join(staging, _NEW)
        for rel, digest in files.items():
            src, dst = os.path.join(new, rel), os.path.join(root, rel)
            real_folders(new, os.path.dirname(rel))
            real_folders(root, os.path.dirname(rel))
            here = src if os.path.lexists(src) else dst
            if not os.path.lexists(here) or not stat.S_ISREG(os.lstat(here).st_mode) or _sha256(here) != digest:
                raise ValueError(f"its file {rel} is missing or changed")
    except (ValueError, SaveError) as exc:
        raise AdapterLoadError(
            f"{path} is not a journal grafting can prove it wrote: {exc}. Nothing was changed; remove it (and the"
            f" {STAGING_PREFIX}* folder it names) to use {root}"
        ) from None
    except OSError as exc:
        raise AdapterLoadError(f"cannot check the unfinished save {path}: {exc}") from None
    return staging, journal


def recover(root: str) -> None:
    """Finish a committed save that was interrupted, if its journal is provably grafting's (call under the lock).

    Playing it forward failing, the commit is rolled back; that failing too, a SaveError names the folder.
    """
    found = _proven_journal(root)
    if found is None:
        return
    staging, journal = found
    try:
        _play_forward(root, staging, journal)
    except OSError as exc:
        try:
            _roll_back(root, staging, journal)
        except OSError:
            raise SaveError(f"cannot finish or undo the interrupted save of {root}: {exc}") from None


@contextlib.contextmanager
def reading(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Hold ``folder``'s lock while reading it, after finishing a provably interrupted save there.

    Nothing is written unless such a journal is there; the parent folder is never looked at. A folder
    that cannot be opened for locking (no read permission on it) is read without the lock.
    """
    root = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(root):
        yield
        return
    with _locked(root, required=False):
        if os.path.lexists(os.path.join(root, JOURNAL_NAME)):
            recover(root)
        yield


def is_bookkeeping(name: str) -> bool:
    """Whether a file name is one of this module's (journal, staging, an old lock), not part of any save."""
    return name in (LOCK_NAME, JOURNAL_NAME) or name.startswith(STAGING_PREFIX)
