"""Atomic file writes and reading adapter weight files."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO

import torch
from safetensors.torch import load_file, save_file

from grafting.errors import AdapterLoadError

SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"


@contextlib.contextmanager
def staged_file(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success, fsync and rename it over ``path``.

    On any error the temporary file is removed and ``path`` is untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with staged_file(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[bytes]]:
    with staged_file(path) as tmp, open(tmp, mode) as fh:
        yield fh


def save_weights(tensors: dict[str, torch.Tensor], path: str, *, safe_serialization: bool = True) -> None:
    """Write a weights file atomically (safetensors, or torch pickle if asked)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with staged_file(path) as tmp:
        if safe_serialization:
            save_file(_untie(tensors), tmp, metadata={"format": "pt"})
        else:
            torch.save(tensors, tmp)


def _untie(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage; clone any tensor seen twice."""
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else id(v)
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def weights_path(folder: str) -> str:
    for name in (SAFETENSORS_NAME, BIN_NAME):
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    raise AdapterLoadError(f"{folder} holds no adapter weights ({SAFETENSORS_NAME} or {BIN_NAME})")


def load_weights(folder: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read an adapter's weights from a folder, refusing pickles that run code."""
    path = weights_path(folder)
    try:
        if path.endswith(".safetensors"):
            return load_file(path, device=str(device))
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise AdapterLoadError(f"cannot read adapter weights {path}: {type(exc).__name__}: {exc}") from None
