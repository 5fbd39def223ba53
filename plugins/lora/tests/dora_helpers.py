"""DoRA's Triton kernels switched on (in Triton's interpreter, on CPU tensors) or off, for a test."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from grafting_lora import dora_kernels


@contextlib.contextmanager
def dora_kernels_on(on: bool) -> Iterator[None]:
    """With ``on``, :mod:`grafting_lora.dora_kernels` runs its Triton kernels interpreted; without, its
    torch ops. Restored after."""
    # the interpreter is chosen when triton is imported: the repository's conftest.py sets it first
    assert os.environ.get("TRITON_INTERPRET") == "1", "TRITON_INTERPRET=1 must be set before triton is imported"
    kept = dora_kernels.USE_TRITON, dora_kernels.INTERPRETED
    dora_kernels.USE_TRITON = dora_kernels.INTERPRETED = on
    try:
        yield
    finally:
        dora_kernels.USE_TRITON, dora_kernels.INTERPRETED = kept
