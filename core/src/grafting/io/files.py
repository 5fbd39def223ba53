"""Atomic file writes and reading adapter weight files."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from typing import IO, Any

import torch
from safetensors import safe_open
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


def write_weights(
    tensors: dict[str, torch.Tensor],
    path: str,
    *,
    safe_serialization: bool = True,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a weights file (safetensors with ``metadata``, or torch pickle if asked) into a staging folder.

    Not atomic by itself: the caller writes into a :func:`grafting.io.transaction.save_transaction`'s
    staging folder, which makes the whole save atomic at once.
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    if safe_serialization:
        save_file(_untie(tensors), path, metadata={"format": "pt", **(metadata or {})})
        _sort_metadata(path)
    else:
        torch.save(tensors, path)


def _sort_metadata(path: str) -> None:
    """Rewrite a safetensors header with its metadata keys sorted, so a save is byte-for-byte reproducible.

    safetensors writes the metadata in hash-map order, which varies between runs once it holds two keys.
    The header keeps its length (same content, reordered); if it would not, the file is left as written.
    """
    with open(path, "r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        raw = fh.read(size)
        header = json.loads(raw)
        meta = header.get("__metadata__")
        if not isinstance(meta, dict) or len(meta) < 2:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) != len(raw.rstrip(b" ")):
            return
        fh.seek(8)
        fh.write(text + b" " * (size - len(text)))


def _untie(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage; clone any tensor seen twice."""
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else id(v)
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


#: safetensors metadata key: the digest of the config saved with these weights (see :func:`config_digest`).
CONFIG_DIGEST_KEY = "grafting_config_sha256"
#: Config keys that describe and do not shape the adapter: editing them keeps weights and config a pair.
_DESCRIPTIVE_KEYS = ("base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping")


def config_digest(data: dict[str, Any]) -> str:
    """SHA-256 of a config's content, less the descriptive keys, in a canonical JSON form."""
    kept = {k: v for k, v in data.items() if k not in _DESCRIPTIVE_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def check_pair(folder: str, config_data: dict[str, Any]) -> None:
    """AdapterLoadError if the folder's safetensors weights were saved with another config than ``config_data``.

    grafting records the config's digest in the weights' metadata; files without it (PEFT's) pass.
    """
    path = weights_path(folder)
    if not path.endswith(".safetensors"):
        return
    try:
        with safe_open(path, framework="pt") as fh:
            recorded = (fh.metadata() or {}).get(CONFIG_DIGEST_KEY)
    except Exception as exc:
        raise AdapterLoadError(f"cannot read adapter weights {path}: {type(exc).__name__}: {str(exc)[:300]}") from None
    if recorded is not None and recorded != config_digest(config_data):
        raise AdapterLoadError(
            f"{path} was saved with another adapter_config.json than the one beside it (a save that did not finish,"
            " or files copied from two saves): refusing to load a mismatched pair"
        )


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
            loaded: Any = load_file(path, device=str(device))
        else:
            loaded = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise AdapterLoadError(f"cannot read adapter weights {path}: {type(exc).__name__}: {str(exc)[:300]}") from None
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise AdapterLoadError(f"{path} does not hold a dict of named tensors: it is not adapter weights")
    return dict(loaded)


def remap_keys(tensors: dict[str, torch.Tensor], key_mapping: dict[str, str] | None) -> dict[str, torch.Tensor]:
    """Rename saved keys with ``key_mapping`` (regex -> replacement; the first pattern that matches wins).

    The patterns see each key without its ``base_model.model.`` (or
    ``base_model.``) prefix, as PEFT applies them.
    """
    if not key_mapping:
        return tensors
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        prefix = next((p for p in ("base_model.model.", "base_model.") if key.startswith(p)), "")
        rest = key[len(prefix) :]
        for pattern, replacement in key_mapping.items():
            renamed, count = re.subn(pattern, replacement, rest)
            if count:
                rest = renamed
                break
        out[prefix + rest] = value
    return out
