"""Describe a saved adapter: method, config, targets, parameters, size, dtypes and a sanity check."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Any

from grafting.cli.common import adapter_folder, human_size
from grafting.io.inspection import describe, natural_order, sanity_check

__all__ = ["add_arguments", "compress", "describe", "render", "run", "sanity_check"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="an adapter folder (adapter_config.json + weights)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def compress(paths: list[str]) -> list[str]:
    """Module paths with the layer index folded: ``model.layers.[0-29].mlp.up_proj``."""
    groups: dict[tuple[str, ...], list[tuple[int, ...]]] = defaultdict(list)
    for path in paths:
        parts = path.split(".")
        shape = tuple("*" if p.isdigit() else p for p in parts)
        groups[shape].append(tuple(int(p) for p in parts if p.isdigit()))
    lines = []
    for shape, indices in sorted(groups.items(), key=lambda item: natural_order(".".join(item[0]))):
        if len(indices) == 1:
            numbers = iter(indices[0])
            lines.append(".".join(str(next(numbers)) if p == "*" else p for p in shape))
        elif shape.count("*") == 1:
            span = _ranges(sorted(i[0] for i in indices))
            lines.append(".".join(f"[{span}]" if p == "*" else p for p in shape))
        else:
            lines.append(".".join(shape) + f"  ({len(indices)} modules)")
    return lines


def _ranges(numbers: list[int]) -> str:
    out: list[str] = []
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ",".join(out)


def render(info: dict[str, Any]) -> str:
    """The report as aligned text."""
    method = info["method"]
    source = f"{method['distribution']} {method['version'] or ''}".strip() if method["distribution"] else "in-process"
    options = ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in info["options"].items())
    check = info["check"]
    if check["ok"]:
        verdict = "ok: every value is finite" + (
            ", shapes fit the config" if check["shapes_checked"] else " (this method's plugin checks no shapes)"
        )
    else:
        verdict = f"FAILED, {len(check['problems'])} problem(s):" + "".join(f"\n    - {p}" for p in check["problems"])
    files = ", ".join(f"{name} {human_size(size)}" for name, size in info["files"].items())
    lines = [
        f"adapter     {info['path']}",
        f"method      {method['peft_type']} ({method['name']}, from {source})",
        f"base model  {info['base_model'] or '(not recorded)'}",
        f"task type   {info['task_type'] or '(none)'}",
        f"options     {options or '(all defaults)'}",
        f"targets     {len(info['targets'])} modules" + "".join(f"\n    {line}" for line in compress(info["targets"])),
    ]
    if info["saved_modules"]:
        lines.append(f"saved       {', '.join(info['saved_modules'])} (trained in full)")
    if info.get("model_level"):
        lines.append(f"model-level {', '.join(info['model_level'])}")
    if info["shared"]:
        lines.append(f"shared      {', '.join(info['shared'])} (one tensor for every layer)")
    dtypes = ", ".join(f"{k} ({v} tensors)" for k, v in info["dtypes"].items())
    lines += [
        f"parameters  {info['parameters']:,} in {info['tensors']} tensors",
        f"size        {human_size(info['size_bytes'])} of weights (files: {files})",
        f"dtypes      {dtypes or '(none)'}",
        f"check       {verdict}",
    ]
    lines += [f"note        {note}" for note in info["notes"]]
    if info["other_adapters"]:
        lines.append(f"also here   adapters {', '.join(info['other_adapters'])} (inspect PATH/NAME)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Exit status 1 when the sanity check finds a problem."""
    info = describe(adapter_folder(args.path))
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0 if info["check"]["ok"] else 1
