"""Hot-swap: replace a loaded adapter's values by another saved adapter's, in place, so a compiled model does not
recompile (PEFT's ``hotswap_adapter`` and ``prepare_model_for_compiled_hotswap``).

Method-agnostic: each layer adapter says, through the protocol, how to grow to a target rank
(:meth:`LayerAdapter.pad_rank`), which values give it a saved adapter's effect
(:meth:`LayerAdapter.hotswap_values`) and which leave it without effect where the saved adapter does not reach
(:meth:`LayerAdapter.hotswap_blank_values`); the core checks every layer, then copies the values into the
existing tensors. Tensors keep their identity, shape and dtype, and the Python attributes the forward reads stay as
they are, so ``torch.compile``'s guards still hold and nothing recompiles.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Literal

import torch
from torch import nn

from grafting.config.adapter_config import load_config
from grafting.errors import AdapterLoadError, AdapterStateError, GraftingWarning, MergeError
from grafting.io.files import load_weights
from grafting.io.hub import resolve_adapter_folder
from grafting.io.state_dict import tuner_of
from grafting.io.transaction import reading
from grafting.model.matching import logical_path
from grafting.model.tuner import AdapterModel

PREFIX = "base_model.model."


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under ``torch.compile``'s wrapper."""
    return getattr(model, "_orig_mod", model)


def _is_compiled(model: nn.Module) -> bool:
    return hasattr(model, "_orig_mod")


def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    *,
    target_rank: int | None = None,
    config: Any = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """Grow every layer adapter to ``target_rank`` (zeros: the outputs do not change), before ``torch.compile``.

    Then adapters of rank up to ``target_rank`` and any alpha swap in without recompiling. ``config`` is
    accepted for PEFT's signature; grafting keeps the loaded adapter's config. A model already compiled is
    refused (``check_compiled="error"``), warned about (``"warn"``) or prepared all the same (``"ignore"``).
    """

    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(f"check_compiled must be 'error', 'warn' or 'ignore', got {check_compiled!r}")
    if _is_compiled(model):
        message = "the model is already compiled: prepare it for hot-swapping before torch.compile"
        if check_compiled == "error":
            raise AdapterStateError(message)
        if check_compiled == "warn":
            warnings.warn(message, GraftingWarning, stacklevel=2)
    if target_rank is None:
        return
    if isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank < 1:
        raise ValueError(f"target_rank must be a positive int, got {target_rank!r}")
    tuner = tuner_of(_unwrap(model))
    owners: list[tuple[str, nn.Module]] = [
        (f"adapter {name!r}'s shared state", shared) for name, shared in tuner.shared_states.items()
    ]
    for path, layer in tuner.adapted_layers():
        owners += [(logical_path(tuner.model, path), adapter) for adapter in layer.adapters.values()]
    snapshot = [_attributes(module) for _, owner in owners for module in owner.modules()]
    for where, owner in owners:
        try:
            owner.pad_rank(target_rank)  # type: ignore[operator]
        except AdapterStateError as error:
            for module, attributes in snapshot:  # the adapters padded so far, as they were: bit-identical
                module.__dict__.clear()
                module.__dict__.update(attributes)
            raise AdapterStateError(f"{where}: {error}") from None


def _attributes(module: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    """A module's attributes, its parameter, buffer and submodule tables copied (padding replaces their entries)."""
    tables = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")
    return module, {k: (copy.copy(v) if k in tables else v) for k, v in module.__dict__.items()}


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: str | os.PathLike[str],
    adapter_name: str,
    torch_device: str | None = None,
    **kwargs: Any,
) -> None:
    """Give the loaded adapter ``adapter_name`` the values of the adapter saved at ``model_name_or_path``, in place.

    Same method, the loaded adapter's target layers or some of them (those the file has no tensors for are left
    without effect, :meth:`LayerAdapter.hotswap_blank_values`), a rank no larger than the loaded (or padded)
    one; any alpha. A compiled
    model (``torch.compile(model)``) is swapped without recompiling. A file that does not fit is an
    :class:`AdapterLoadError` or :class:`AdapterStateError`, an adapter merged into the base weights a
    :class:`MergeError` (unmerge it first); either changes nothing. ``torch_device`` and
    ``kwargs`` (``subfolder``, ``revision``) locate the file as ``from_pretrained`` does.
    """

    folder = resolve_adapter_folder(model_name_or_path, kwargs.get("subfolder"), kwargs.get("revision"))
    with reading(folder):
        config = load_config(folder)
        tensors = load_weights(folder, device=torch_device or "cpu")
    hotswap_adapter_from_state_dict(model, tensors, adapter_name, config)


@torch.no_grad()
def hotswap_adapter_from_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str, config: Any
) -> None:
    """:func:`hotswap_adapter` from tensors already loaded (PEFT's keys) and their config."""

    tuner = tuner_of(_unwrap(model))
    tuner.require_adapter(adapter_name)
    _refuse_merged(tuner, adapter_name)
    loaded = tuner.peft_config[adapter_name]
    if type(config) is not type(loaded):
        raise AdapterLoadError(
            f"cannot hot-swap a {type(config).__name__} adapter into {adapter_name!r}, a {type(loaded).__name__}:"
            " hot-swapping keeps the method"
        )
    remaining = dict(state_dict)
    plan: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
    if adapter_name in tuner.shared_states:
        plan.append(_shared_plan(tuner.shared_states[adapter_name], remaining, config))
    layers = {
        logical_path(tuner.model, path): (layer.adapters[adapter_name], layer.base_layer)
        for path, layer in tuner.adapted_layers()
        if adapter_name in layer.adapters
    }
    by_layer = _keys_by_layer(remaining, layers)
    if layers and not by_layer:
        raise AdapterLoadError(
            f"the new adapter has no tensors for any layer of {adapter_name!r} ({next(iter(layers))}, ...):"
            " it targets other layers"
        )
    for name, (adapter, base_layer) in layers.items():
        found = by_layer.get(name)
        try:  # a layer the file does not cover is left without effect (the new adapter targets a subset)
            values = adapter.hotswap_values(found, config, name) if found else adapter.hotswap_blank_values(base_layer)
        except AdapterStateError as error:
            reason = "" if found else "the new adapter has no tensors for this layer, and "
            raise AdapterStateError(f"{name}: {reason}{error}") from None
        targets = adapter.state_dict(keep_vars=True)
        _check_values(values, targets, name)
        plan.append((targets, values))
    if remaining:
        extra = sorted(remaining)
        raise AdapterLoadError(
            f"the new adapter has tensors the loaded one lacks (other target layers?): {', '.join(extra[:3])}"
            + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        )
    for targets, values in plan:  # not through .data: the version counters move (caches of the values see it)
        for key, value in values.items():
            targets[key].copy_(value.to(targets[key].dtype))


def _refuse_merged(tuner: AdapterModel, adapter_name: str) -> None:
    """A merged adapter's values are in the base weights: unmerging after a swap would subtract the new ones."""
    merged = [logical_path(tuner.model, path) for path, layer in tuner.adapted_layers() if adapter_name in layer.merged]
    if merged:
        raise MergeError(  # PEFT's first sentence, for code that matches it
            f"Cannot hot-swap adapter '{adapter_name}' because it is currently merged into the base weights. It is"
            f" merged at {merged[0]}"
            + (f" and {len(merged) - 1} more layers" if len(merged) > 1 else "")
            + ", and unmerging after the swap would subtract the new values instead of the merged ones:"
            " unmerge it first (unmerge_adapter())."
        )


def _keys_by_layer(remaining: dict[str, torch.Tensor], layers: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """The file's layer tensors by adapted layer (the longest layer name that prefixes the key: a nested layer's
    keys are its own), by local key; those taken are removed from ``remaining``. A method may save keys its
    loaded adapter has not (LoKr's factors where it holds the product), so every key under the layer is given."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key in [k for k in remaining if k.startswith(PREFIX)]:
        parts = key[len(PREFIX) :].split(".")
        for cut in range(len(parts) - 1, 0, -1):
            name = ".".join(parts[:cut])
            if name in layers:
                out.setdefault(name, {})[".".join(parts[cut:])] = remaining.pop(key)
                break
    return out


def _check_values(values: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], where: str) -> None:
    """Every value names a tensor of the loaded adapter, has its shape and is finite."""
    for key, value in values.items():
        if key not in targets or value.shape != targets[key].shape:
            raise AdapterStateError(f"{where}: the hot-swap value for {key} does not fit the loaded adapter")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise AdapterLoadError(f"{where}: the new adapter's {key} holds NaN or infinite values")


def _shared_plan(
    shared: nn.Module, remaining: dict[str, torch.Tensor], config: Any
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The shared state's tensors (buffers included, persistent or not) and the values the new adapter gives them;
    the file's shared keys (``base_model.<key>``, not a layer's) are taken out of ``remaining``."""
    targets = {**dict(shared.named_parameters()), **dict(shared.named_buffers())}
    shared_keys = [k for k in remaining if k.startswith("base_model.") and not k.startswith(PREFIX)]
    found = {k.removeprefix("base_model."): remaining.pop(k) for k in shared_keys}
    try:
        values = shared.hotswap_values(found, config)  # type: ignore[operator]
    except AdapterStateError as error:
        raise AdapterStateError(f"the shared state: {error}") from None
    _check_values(values, targets, "the shared state")
    return targets, values
