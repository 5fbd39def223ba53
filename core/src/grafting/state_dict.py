"""Adapter weights in PEFT's key layout: gather them from a model, put them back."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs
import torch
from torch import nn

from grafting.errors import AdapterLoadError, StateDictKeyError
from grafting.matching import logical_path

PREFIX = "base_model.model."
#: Where a model-level adapter's file keeps base-model tensors (modules_to_save).
MODEL_LEVEL_PREFIX = "base_model."


def tuner_of(model: nn.Module) -> Any:
    """The AdapterModel behind a PeftModel (or the AdapterModel itself)."""
    from grafting.tuner import AdapterModel

    if isinstance(model, AdapterModel):
        return model
    base = getattr(model, "base_model", None)
    if isinstance(base, AdapterModel):
        return base
    raise TypeError(f"{type(model).__name__} holds no grafting adapters")


@attrs.frozen
class Slot:
    """Where one saved tensor lives: a module and the attribute name on it."""

    module: nn.Module
    attr: str
    device: torch.device = attrs.field(factory=lambda: torch.device("cpu"))

    def get(self) -> torch.Tensor:
        return getattr(self.module, self.attr)


def _local_slots(prefix: str, module: nn.Module, near: nn.Module) -> Iterator[tuple[str, Slot]]:
    device = _device_of(near)
    for name in module.state_dict(keep_vars=True):
        owner_path, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        yield prefix + name, Slot(owner, attr, device)


def adapter_slots(model: nn.Module, adapter_name: str) -> dict[str, Slot]:
    """Every tensor adapter ``adapter_name`` saves, by its PEFT key (model adapters excluded)."""
    tuner = tuner_of(model)
    slots: dict[str, Slot] = {}
    for path, layer in tuner.adapted_layers():
        if adapter_name in layer.adapters:
            key = f"{PREFIX}{logical_path(tuner.model, path)}."
            slots.update(_local_slots(key, layer.adapters[adapter_name], layer.base_layer))
    for path, wrapper in tuner.save_wrappers():
        if adapter_name in wrapper.modules_to_save:
            key = f"{PREFIX}{logical_path(tuner.model, path)}."
            slots.update(_local_slots(key, wrapper.modules_to_save[adapter_name], wrapper.original_module))
    config = tuner.peft_config[adapter_name]
    for pname in config.trainable_base_parameters(tuner.model, [p for p, _ in tuner.adapted_layers()]):
        owner_path, _, attr = pname.rpartition(".")
        owner = tuner.model.get_submodule(owner_path)
        slots[f"{PREFIX}{logical_path(tuner.model, owner_path)}.{attr}"] = Slot(owner, attr, _device_of(owner))
    if adapter_name in tuner.model_adapters:  # PEFT's base_model is the user's model itself for these methods
        slots = {MODEL_LEVEL_PREFIX + key[len(PREFIX) :]: slot for key, slot in slots.items()}
    if adapter_name in tuner.shared_states:  # saved once, beside the layers: base_model.<key> (PEFT's vera_A)
        near = next((layer.base_layer for _, layer in tuner.adapted_layers() if adapter_name in layer.adapters), None)
        shared = tuner.shared_states[adapter_name]
        slots.update(_local_slots(MODEL_LEVEL_PREFIX, shared, shared if near is None else near))
    return slots


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """The tensors of one adapter, keyed as PEFT saves them (adapter name dropped).

    Without ``state_dict`` they are read from the model; a tensor sharded by FSDP2 (a ``DTensor``) is
    gathered, which is a collective: every rank must call. With ``state_dict`` (the whole model's, keyed as
    ``model.state_dict()``, e.g. a full state dict gathered from a sharded model) the adapter's tensors are
    taken from it instead; a model-level adapter's saved tensors are computed from the model, as PEFT does.
    """
    tuner = tuner_of(model)
    tuner._require(adapter_name)
    slots = adapter_slots(model, adapter_name)
    if save_embedding_layers is True:
        slots.update(embedding_slots(tuner, adapter_name))
    if state_dict is None:
        out = {key: full_tensor(slot.get()) for key, slot in slots.items()}
    else:
        out = _from_state_dict(model, slots, state_dict, adapter_name)
    if adapter_name in tuner.model_adapters:
        out.update({k: full_tensor(v) for k, v in tuner.model_adapters[adapter_name].peft_state_dict().items()})
    return out


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` detached, and whole: a ``DTensor`` shard (FSDP2) is gathered from every rank."""
    tensor = tensor.detach()
    gather = getattr(tensor, "full_tensor", None)  # torch.distributed.tensor.DTensor
    return gather() if callable(gather) else tensor


def _from_state_dict(
    model: nn.Module, slots: dict[str, Slot], state_dict: dict[str, torch.Tensor], adapter_name: str
) -> dict[str, torch.Tensor]:
    """The adapter's tensors picked from ``state_dict`` (keyed as ``model.state_dict()``) by their slots."""
    names: dict[tuple[int, str], list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for attr in [*module._parameters, *module._buffers]:
            names.setdefault((id(module), attr), []).append(f"{path}.{attr}" if path else attr)
    out: dict[str, torch.Tensor] = {}
    for key, slot in slots.items():
        candidates = names.get((id(slot.module), slot.attr), [])
        found = next((name for name in candidates if name in state_dict), None)
        if found is None:
            raise StateDictKeyError(
                f"the given state_dict has no tensor for adapter {adapter_name!r}'s {key}"
                f" (looked for {candidates or 'a key of the model'}; is it the whole model's state dict, keyed as"
                f" {type(model).__name__}.state_dict()?)"
            )
        out[key] = state_dict[found].detach()
    return out


def embedding_slots(tuner: Any, adapter_name: str) -> dict[str, Slot]:
    """The input and output embedding weights, keyed as PEFT saves them with ``save_embedding_layers``.

    PEFT writes them (``<path>.base_layer.weight`` for an adapted embedding)
    when an adapter targets ``embed_tokens``, so that a resized vocabulary
    comes back; a file that holds them loads them into the base model.
    """
    from grafting.layer import AdaptedLayer

    prefix = MODEL_LEVEL_PREFIX if adapter_name in tuner.model_adapters else PREFIX
    slots: dict[str, Slot] = {}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(tuner.model, getter, None)
        emb = fn() if callable(fn) else None
        base = emb.base_layer if isinstance(emb, AdaptedLayer) else emb
        if not isinstance(getattr(base, "weight", None), torch.Tensor):
            continue
        for name, module in tuner.model.named_modules():
            if module is base:
                slots[f"{prefix}{logical_path(tuner.model, name)}.weight"] = Slot(base, "weight", _device_of(base))
    return slots


@attrs.frozen
class LoadResult:
    """Keys of the file that fit nothing, and adapter tensors the file did not provide."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> LoadResult:
    """Load PEFT-keyed tensors into adapter ``adapter_name``.

    Shapes are checked for every key before any tensor is written, so a bad
    file leaves the adapter as it was. Meta tensors (``low_cpu_mem_usage``)
    are materialized on their base layer's device.
    """
    tuner = tuner_of(model)
    tuner._require(adapter_name)
    state = dict(peft_model_state_dict)
    model_level: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    if adapter_name in tuner.model_adapters:
        wanted = tuner.model_adapters[adapter_name].peft_state_dict()
        for key in wanted:
            if key in state:
                model_level[key] = state.pop(key)
            else:
                missing.append(key)
    slots = adapter_slots(model, adapter_name)
    plan: list[tuple[Slot, torch.Tensor]] = []
    for key, slot in slots.items():
        if key not in state:
            missing.append(key)
            continue
        value = state.pop(key)
        current = slot.get()
        if tuple(current.shape) != tuple(value.shape):
            if ignore_mismatched_sizes:
                continue
            raise AdapterLoadError(
                f"adapter {adapter_name!r}: {key} has shape {tuple(value.shape)} in the file but "
                f"{tuple(current.shape)} in the model (is the config's r or target set the one it was saved with?)"
            )
        plan.append((slot, value))
    _drop_wrapper_copies(tuner, adapter_name, state)
    for key, slot in embedding_slots(tuner, adapter_name).items():  # optional: only if the file holds them
        if key in state:
            value = state.pop(key)
            if tuple(slot.get().shape) != tuple(value.shape):
                raise AdapterLoadError(
                    f"adapter {adapter_name!r}: {key} has shape {tuple(value.shape)} in the file but "
                    f"{tuple(slot.get().shape)} in the model (resize the model's embeddings first)"
                )
            plan.append((slot, value))
    with torch.no_grad():
        for slot, value in plan:
            current = slot.get()
            if current.is_meta:
                new = value.to(device=slot.device, dtype=current.dtype)
                if isinstance(current, nn.Parameter):
                    new = nn.Parameter(new, requires_grad=current.requires_grad)
                setattr(slot.module, slot.attr, new)
            else:
                current.copy_(value.to(dtype=current.dtype))
        if model_level:
            tuner.model_adapters[adapter_name].load_peft_state_dict(model_level)
    return LoadResult(missing_keys=missing, unexpected_keys=sorted(state))


def _drop_wrapper_copies(tuner: Any, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
    """Drop the keys PEFT writes for a modules_to_save wrapper's internals (with ``bias="all"``).

    ``<head>.modules_to_save.bias`` repeats ``<head>.bias`` (the trained copy) and
    ``<head>.original_module.bias`` is the frozen original: neither is an adapter tensor.
    """
    prefix = MODEL_LEVEL_PREFIX if adapter_name in tuner.model_adapters else PREFIX
    for path, _ in tuner.save_wrappers():
        head = f"{prefix}{logical_path(tuner.model, path)}."
        for key in [k for k in state if k.startswith((head + "modules_to_save.", head + "original_module."))]:
            del state[key]


def _device_of(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        if not tensor.is_meta:
            return tensor.device
    return torch.device("cpu")
