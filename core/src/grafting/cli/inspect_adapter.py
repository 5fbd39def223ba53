"""Describe a saved adapter: method, config, targets, parameters, size, dtypes and a sanity check."""

from __future__ import annotations

import argparse
import json
import re
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch

from grafting.cli.common import adapter_folder, human_size, sub_adapters
from grafting.config.adapter_config import CONFIG_NAME, read_config_file
from grafting.io.files import load_weights, weights_path
from grafting.io.load_plan import FLOAT_DTYPES
from grafting.model.matching import name_matches
from grafting.registry.dispatch import config_from_dict
from grafting.registry.plugins import get_method, get_registry

#: On-disk keys of layer adapters and saved modules start with this (PEFT's layout).
MODEL_PREFIX = "base_model.model."
#: Config fields shown apart from the options, or not at all.
NOT_OPTIONS = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="an adapter folder (adapter_config.json + weights)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def module_of(key: str) -> str:
    """The module path of an on-disk key: the key less its local name (``lora_A.weight``, ``ia3_l``)."""
    parts = key.split(".")
    drop = 2 if parts[-1] in ("weight", "bias") and len(parts) > 2 else 1
    return ".".join(parts[:-drop])


def group_keys(keys: list[str], modules_to_save: list[str] | None) -> dict[str, list[str]]:
    """Sort keys into adapted modules, fully saved modules (``modules_to_save``) and model-level tensors."""
    targets: set[str] = set()
    saved: set[str] = set()
    model_level: list[str] = []
    for key in keys:
        if not key.startswith(MODEL_PREFIX):
            model_level.append(key)
            continue
        path = key[len(MODEL_PREFIX) :]
        parts = path.split(".")
        prefixes = (".".join(parts[:i]) for i in range(1, len(parts)))
        owner = next((p for p in prefixes if name_matches(p, modules_to_save)), None)
        if owner is not None:
            saved.add(owner)
        else:
            targets.add(module_of(path))
    return {
        "targets": sorted(targets, key=_natural),
        "saved_modules": sorted(saved),
        "model_level": sorted(model_level),
    }


def _natural(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def compress(paths: list[str]) -> list[str]:
    """Module paths with the layer index folded: ``model.layers.[0-29].mlp.up_proj``."""
    groups: dict[tuple[str, ...], list[tuple[int, ...]]] = defaultdict(list)
    for path in paths:
        parts = path.split(".")
        shape = tuple("*" if p.isdigit() else p for p in parts)
        groups[shape].append(tuple(int(p) for p in parts if p.isdigit()))
    lines = []
    for shape, indices in sorted(groups.items(), key=lambda item: _natural(".".join(item[0]))):
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


def non_default_options(config: Any) -> dict[str, Any]:
    """The config's options that differ from the method's defaults (all of them if it has no defaults)."""
    data = {k: v for k, v in config.to_dict().items() if k not in NOT_OPTIONS}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            defaults = type(config)().to_dict()
    except Exception:
        return data
    return {k: v for k, v in data.items() if k not in defaults or defaults[k] != v}


def sanity_check(config: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Dtypes a parameter cannot take, non-finite values, and shapes against the config (by the method's plugin).

    The config itself was validated when it was read, as a load validates it.
    """
    problems: list[str] = []
    if not tensors:
        problems.append("the weights file holds no tensors")
    for key, tensor in tensors.items():
        if tensor.dtype not in FLOAT_DTYPES:
            problems.append(f"{key}: {str(tensor.dtype).removeprefix('torch.')} values cannot load into a parameter")
        elif not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            problems.append(f"{key}: {bad} of {tensor.numel()} values are NaN or infinite")
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    method = get_method(str(config.peft_type))
    shape_problems = get_registry().call(method, "grafting_check_saved_shapes", config=config, shapes=shapes)
    if shape_problems:
        problems += list(shape_problems)
    return {"ok": not problems, "problems": problems, "shapes_checked": shape_problems is not None}


def describe(folder: Path) -> dict[str, Any]:
    """Everything ``grafting inspect`` reports about one adapter folder."""
    data = read_config_file(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = config_from_dict(data, source=str(folder / CONFIG_NAME))  # the checks a load makes
    method = get_method(config.peft_type)
    weights = Path(weights_path(str(folder)))
    tensors = load_weights(str(folder))
    groups = group_keys(list(tensors), config.modules_to_save)
    if method.level == "layer":  # a layer method's keys outside the layers are its shared state
        groups["shared"] = groups.pop("model_level")
    else:
        groups["shared"] = []
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    return {
        "path": str(folder),
        "method": {
            "peft_type": method.peft_type,
            "name": method.name,
            "distribution": method.distribution,
            "version": method.version,
        },
        "base_model": config.base_model_name_or_path,
        "task_type": config.task_type,
        "config": config.to_dict(),
        "options": non_default_options(config),
        **groups,
        "parameters": sum(t.numel() for t in tensors.values()),
        "tensors": len(tensors),
        "weights_file": weights.name,
        "size_bytes": weights.stat().st_size,
        "files": files,
        "dtypes": dict(Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values())),
        "check": sanity_check(config, tensors),
        "notes": [str(w.message) for w in caught],
        "other_adapters": [p.name for p in sub_adapters(folder)],
    }


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
