"""Make a source checkout's plugins discoverable without installing them: one ``.dist-info`` with their entry points.

Usage: python benchmarks/source_entry_points.py DIR (Python 3.11+), then put DIR on ``PYTHONPATH`` beside the ``src`` folders.

grafting finds its method plugins through the ``grafting`` entry-point group, which only installed
distributions declare. A machine that runs the checkout from ``PYTHONPATH`` (the GPU device: no build
backend to install with) has none, so ``get_peft_model`` finds no method. This writes
``DIR/grafting_source_checkout-0.dist-info`` holding every entry point the checkout's ``pyproject.toml``
files declare; ``importlib.metadata`` reads it from the path as it reads an installed distribution's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
NAME = "grafting_source_checkout"


def declared_entry_points(root: Path = ROOT) -> dict[str, dict[str, str]]:
    """``{group: {name: target}}`` over the core's, the plugins' and contrib's ``pyproject.toml``."""
    groups: dict[str, dict[str, str]] = {}
    for pyproject in sorted(
        [
            root / "core" / "pyproject.toml",
            *root.glob("plugins/*/pyproject.toml"),
            *root.glob("contrib/*/pyproject.toml"),
        ]
    ):
        project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
        for group, entries in project.get("entry-points", {}).items():
            groups.setdefault(group, {}).update(entries)
        if "scripts" in project:
            groups.setdefault("console_scripts", {}).update(project["scripts"])
    return groups


def write(directory: Path, groups: dict[str, dict[str, str]]) -> Path:
    info = directory / f"{NAME}-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {NAME}\nVersion: 0\n", encoding="utf-8")
    lines = []
    for group, entries in groups.items():
        lines += [f"[{group}]", *(f"{name} = {target}" for name, target in entries.items()), ""]
    (info / "entry_points.txt").write_text("\n".join(lines), encoding="utf-8")
    return info


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.splitlines()[2])
    print(write(Path(sys.argv[1]), declared_entry_points()))
