"""A saved adapter described: method, config, targets, tensors, sizes and a sanity check (``grafting inspect``).

:func:`inspect_adapter` is the public entry point (``grafting.inspect_adapter``); the
command line renders its dict as text or JSON.
"""

from __future__ import annotations

import os
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from grafting.config.adapter_config import CONFIG_NAME, read_config_file
from grafting.errors import AdapterLoadError
from grafting.io.files import load_weights, weights_path
from grafting.io.state_dict import FLOAT_DTYPES
from grafting.model.matching import name_matches
from grafting.registry.dispatch import config_from_dict
from grafting.registry.plugins import get_method, get_registry

#: On-disk keys of layer adapters and saved modules start with this (PEFT's layout).
MODEL_PREFIX = "base_model.model."
#: Config fields shown apart from the options, or not at all.
NOT_OPTIONS = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode"}


def inspect_adapter(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``grafting inspect PATH --json`` prints, as a dict: read and checked as a load reads it, nothing loaded.

    Keys: ``path``, ``method`` (peft_type, name, distribution, version), ``base_model``, ``task_type``,
    ``config``, ``options`` (those differing from the method's defaults), ``targets``, ``saved_modules``,
    ``shared``, ``parameters``, ``tensors``, ``weights_file``, ``size_bytes``, ``files``, ``dtypes``,
    ``check`` (``ok``, ``problems``, ``shapes_checked``), ``notes`` (warnings a load gives) and
    ``other_adapters`` (subfolders holding further adapters). Raises :class:`AdapterLoadError` when
    ``path`` is no adapter folder.
    """
    folder = Path(path).expanduser()
    if not (folder / CONFIG_NAME).is_file():
        raise AdapterLoadError(f"{path}: not an adapter folder (no {CONFIG_NAME})")
    return describe(folder)


def sub_adapters(folder: Path) -> list[Path]:
    """Subfolders that are adapters themselves (PEFT saves every adapter but ``default`` in one)."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and (p / CONFIG_NAME).is_file())


def module_of(key: str) -> str:
    """The module path of an on-disk key: the key less its local name (``lora_A.weight``, ``ia3_l``)."""
    parts = key.split(".")
    drop = 2 if parts[-1] in ("weight", "bias") and len(parts) > 2 else 1
    return ".".join(parts[:-drop])


def describe(folder: Path) -> dict[str, Any]:
    """Everything ``grafting inspect`` reports about one adapter folder (see :func:`inspect_adapter`)."""
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
        "targets": sorted(targets, key=natural_order),
        "saved_modules": sorted(saved),
        "model_level": sorted(model_level),
    }


def natural_order(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


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
