"""Forwards and weight changes of one model exclude each other across threads.

A merge or unmerge changes layer after layer; a forward in another thread meanwhile would compute with
some layers merged and others not (the adapter counted twice, or not at all). :class:`WeightsGuard` is a
readers-writer lock: forwards (and ``generate``) are readers and run together; a merge, unmerge,
``set_adapter`` or ``unload`` is a writer that waits for the forwards running in other threads to end
and makes new ones wait until it is done. So a forward sees the old or the new weights, never a mix.
Both are re-entrant in one thread (a forward hook may merge). Inside ``torch.compile`` tracing the
guard steps aside (a compiled forward cannot wait on a lock; compile the model after merging).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from grafting.errors import AdapterStateError

#: Seconds a weight change waits for forwards in other threads to finish before it is refused.
WRITE_TIMEOUT = 600.0


class WeightsGuard:
    """A re-entrant readers-writer lock; deep copies and pickles get a fresh, free one."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers: dict[int, int] = {}
        self._writer: int | None = None
        self._writer_depth = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> WeightsGuard:
        return WeightsGuard()

    def __reduce__(self) -> tuple[type[WeightsGuard], tuple[()]]:
        return WeightsGuard, ()

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Hold while a forward runs: waits for a weight change in another thread to finish."""
        if torch.compiler.is_compiling():
            yield
            return
        me = threading.get_ident()
        with self._cond:
            self._cond.wait_for(lambda: self._writer is None or self._writer == me)
            self._readers[me] = self._readers.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._readers[me] -= 1
                if not self._readers[me]:
                    del self._readers[me]
                self._cond.notify_all()

    @contextlib.contextmanager
    def writing(self, what: str, timeout: float | None = None) -> Iterator[None]:
        """Hold while weights change: waits for other threads' forwards; AdapterStateError after ``timeout``."""
        me = threading.get_ident()
        wait = WRITE_TIMEOUT if timeout is None else timeout
        start = time.monotonic()
        with self._cond:
            if self._writer != me:
                free = self._cond.wait_for(lambda: self._writer is None and not set(self._readers) - {me}, wait)
                if not free:
                    raise AdapterStateError(
                        f"{what}: forwards in other threads kept the model busy for {time.monotonic() - start:.1f} s;"
                        " nothing was changed"
                    )
                self._writer = me
            self._writer_depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._writer_depth -= 1
                if not self._writer_depth:
                    self._writer = None
                self._cond.notify_all()
