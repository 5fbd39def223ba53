"""What the subcommands share: the one-line error and finding an adapter folder."""

from __future__ import annotations

from pathlib import Path

from grafting.config.adapter_config import CONFIG_NAME
from grafting.io.inspection import sub_adapters


class CommandError(Exception):
    """A failure a command reports in one line."""


def adapter_folder(path: str) -> Path:
    """``path`` as an adapter folder (it holds adapter_config.json), or a CommandError saying what it is instead."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise CommandError(f"{path} does not exist")
    if not folder.is_dir():
        raise CommandError(f"{path} is a file, not an adapter folder")
    if not (folder / CONFIG_NAME).is_file():
        inside = sub_adapters(folder)
        if inside:
            names = ", ".join(p.name for p in inside)
            raise CommandError(f"{path} is not an adapter folder, but holds adapters in: {names}")
        raise CommandError(f"{path} is not an adapter folder: it has no {CONFIG_NAME}")
    return folder


def human_size(n: float) -> str:
    """Bytes as B, KiB, MiB or GiB."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
