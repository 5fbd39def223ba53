"""Which modules of a model a config targets."""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from torch import nn

from grafting.errors import TargetNotFoundError, UnusedOptionWarning
from grafting.model.layer import AdaptedLayer
from grafting.model.modules_to_save import ModulesToSaveWrapper

ALL_LINEAR = "all-linear"
V = TypeVar("V")


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def name_matches(name: str, spec: list[str] | str | None) -> bool:
    """A list entry matches exactly or as a dotted suffix; a string is a full-match regex."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


def pattern_key(patterns: Iterable[str], name: str) -> str | None:
    """The first key of a ``rank_pattern``-style dict that matches ``name`` (suffix regex)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def warn_unmatched_patterns(config: Any, names: list[str]) -> None:
    """Warn about keys of the config's ``pattern_fields`` that match none of the adapted modules ``names``."""
    for field in getattr(config, "pattern_fields", ()):
        patterns = getattr(config, field, None) or {}
        unmatched = sorted(key for key in patterns if not any(pattern_key([key], name) for name in names))
        if unmatched:
            warnings.warn(
                f"{type(config).__name__}.{field} keys {unmatched} match none of the adapted modules; they have"
                " no effect",
                UnusedOptionWarning,
                stacklevel=4,
            )


def pattern_value(patterns: Mapping[str, V], name: str, default: V) -> V:
    """The value of the first key of ``patterns`` matching ``name`` (``rank_pattern`` style), else ``default``."""
    key = pattern_key(patterns, name)
    return patterns[key] if key is not None else default


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The layer index in ``name``: the number after ``<layers_pattern>.``, as PEFT reads it.

    Without a pattern it is the first number that follows a named container
    (``model.layers.3.mlp`` -> 3); with one, the first ``<pattern>.<i>.``.
    """
    if not layers_pattern:
        found = re.match(r".*?\.[^.]*\.(\d+)\.", name)
        return int(found.group(1)) if found else None
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        found = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", name)
        if found:
            return int(found.group(1))
    return None


def _output_embedding_names(model: nn.Module) -> set[str]:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        return set()
    return {n for n, m in model.named_modules() if m is head}


def candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules that may be targeted, by their logical names, in model order.

    grafting's wrappers are seen through: an :class:`AdaptedLayer` is listed
    under its base layer's name, and the base layer's submodules under the
    wrapper's name without ``base_layer`` (``self_attn.q_proj``, as in the
    plain model), so a module inside an adapted module can be targeted too.
    Adapters and :class:`ModulesToSaveWrapper` copies are not candidates.
    """

    out: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = prefix + name
            out.append((path, child))
            if isinstance(child, ModulesToSaveWrapper):  # listed, so a later adapter adds its copy; not its copies
                continue
            visit(child.base_layer if isinstance(child, AdaptedLayer) else child, path + ".")

    visit(model, "")
    return out


def physical_path(model: nn.Module, name: str) -> str:
    """The attribute path of the module a logical name designates (``base_layer`` steps put back)."""
    atoms: list[str] = []
    module = model
    for item in name.split("."):
        if isinstance(module, AdaptedLayer) and item not in module._modules:
            atoms.append("base_layer")
            module = module.base_layer
        atoms.append(item)
        module = module._modules[item]  # type: ignore[assignment]
    return ".".join(atoms)


def logical_path(model: nn.Module, path: str) -> str:
    """The logical (PEFT) name of the module at attribute ``path``.

    The ``base_layer`` step of an :class:`AdaptedLayer` is left out where the
    path goes on into the base layer's submodules; a path that ends at a base
    layer keeps it (``q_proj.base_layer``, as PEFT names a wrapped layer's own
    weights).
    """
    if not path:
        return path
    atoms = path.split(".")
    out: list[str] = []
    module = model
    for i, item in enumerate(atoms):
        if not (isinstance(module, AdaptedLayer) and item == "base_layer" and i < len(atoms) - 1):
            out.append(item)
        module = module._modules[item]  # type: ignore[assignment]
    return ".".join(out)


def find_targets(model: nn.Module, config: Any, defaults: list[str] | str | None = None) -> list[str]:
    """Logical names of the modules ``config`` adapts, in model order; raises if none.

    The method has the last word through ``config.select_targets`` (adaption
    prompt keeps the top layers' attention modules).
    """
    spec = config.target_modules if config.target_modules is not None else defaults
    if spec is None:
        raise TargetNotFoundError(
            f"{type(config).__name__}: target_modules is not set and no default is known for "
            f"model type {getattr(getattr(model, 'config', None), 'model_type', type(model).__name__)!r}; "
            "set target_modules"
        )
    candidates = candidate_modules(model)
    if spec == ALL_LINEAR or spec == [ALL_LINEAR]:
        heads = _output_embedding_names(model)
        names = [n for n, m in candidates if _is_linear(_unwrap(m)) and n not in heads]
    else:
        names = [n for n, _ in candidates if name_matches(n, spec)]
    if config.exclude_modules is not None:
        names = [n for n in names if not name_matches(n, config.exclude_modules)]
    saved = config.modules_to_save or []
    names = [n for n in names if not name_matches(n, saved)]
    if config.layers_to_transform is not None:
        wanted = set(config.layers_to_transform)
        names = [n for n in names if layer_index(n, config.layers_pattern) in wanted]
    names = config.select_targets(model, names)  # may add modules other options adapt (LoRA's target_parameters)
    if not names:
        raise TargetNotFoundError(_no_match_message(config, spec, [n for n, _ in candidates]))
    return names


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "base_layer", module)


def _no_match_message(config: Any, spec: Any, names: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    wanted = [spec] if isinstance(spec, str) else list(spec)
    close: list[str] = []
    for key in wanted:
        close += difflib.get_close_matches(str(key).rsplit(".", 1)[-1], leaves, n=3, cutoff=0.5)
    close = sorted(set(close)) or leaves[:8]
    extra = ""
    if config.layers_to_transform is not None:
        extra = f" with layers_to_transform={config.layers_to_transform}"
    if config.exclude_modules is not None:
        extra += f" and exclude_modules={config.exclude_modules!r}"
    return (
        f"{type(config).__name__}: target_modules={spec!r}{extra} matches no module of the model; "
        f"closest module names: {close}"
    )
