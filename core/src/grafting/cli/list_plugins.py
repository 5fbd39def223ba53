"""List the installed methods and any plugin that failed to load."""

from __future__ import annotations

import argparse
import json
from typing import Any

from grafting.registry.plugins import get_registry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument("--verbose", "-v", action="store_true", help="show the traceback of each failed plugin")


def report() -> dict[str, Any]:
    """The methods (peft_type, name, level, distribution, version, entry point) and the load failures."""
    registry = get_registry()
    methods = [
        {
            "peft_type": m.peft_type,
            "name": m.name,
            "level": m.level,
            "config": m.config_class.__name__,
            "distribution": m.distribution,
            "version": m.version,
            "entry_point": m.entry_point,
            "description": m.description,
        }
        for m in sorted(registry.methods.values(), key=lambda m: m.peft_type)
    ]
    failures = [
        {"entry_point": f.entry_point, "distribution": f.distribution, "error": f.error, "traceback": f.traceback}
        for f in registry.failures
    ]
    return {"methods": methods, "failures": failures}


def run(args: argparse.Namespace) -> int:
    """Exit status 1 when a plugin failed to load, so scripts can check an environment."""
    data = report()
    if args.json:
        print(json.dumps(data, indent=2))
        return 1 if data["failures"] else 0
    methods = data["methods"]
    if methods:
        rows = [
            (
                m["peft_type"],
                m["name"],
                m["level"],
                f"{m['distribution'] or '(in-process)'} {m['version'] or ''}".strip(),
                m["entry_point"] or "",
            )
            for m in methods
        ]
        header = ("METHOD", "NAME", "LEVEL", "DISTRIBUTION", "ENTRY POINT")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    else:
        print("no grafting methods are installed; install one, e.g. `pip install grafting-lora`")
    if data["failures"]:
        print("\nplugins that failed to load:")
    for failure in data["failures"]:
        dist = f" (from {failure['distribution']})" if failure["distribution"] else ""
        print(f"  {failure['entry_point']}{dist}: {failure['error']}")
        if args.verbose:
            print(failure["traceback"])
    return 1 if data["failures"] else 0
