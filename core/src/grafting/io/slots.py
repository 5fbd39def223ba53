"""Where each adapter tensor lives, by its key in PEFT's layout: the tuner of a model, and a slot per key."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs
import torch
from torch import nn

from grafting.model.layer import AdaptedLayer
from grafting.model.matching import logical_path
from grafting.model.modules_to_save import ModulesToSaveWrapper
from grafting.model.tuner import AdapterModel

PREFIX = "base_model.model."


#: Where a model-level adapter's file keeps base-model tensors (modules_to_save).
MODEL_LEVEL_PREFIX = "base_model."


#: The attribute of a model that ``inject_adapter_in_model`` changed, holding its tuner.
TUNER_ATTRIBUTE = "_grafting_tuner"


def attach_tuner(model: nn.Module, tuner: Any) -> None:
    """Keep ``tuner`` reachable from ``model`` as a plain attribute (not a submodule: state_dict stays as it was)."""
    model.__dict__[TUNER_ATTRIBUTE] = tuner
    model.__dict__["peft_config"] = tuner.peft_config  # as PEFT sets it on an injected model


def injected_tuner(model: nn.Module) -> Any:
    """The tuner ``inject_adapter_in_model`` left on ``model``, or None."""
    return model.__dict__.get(TUNER_ATTRIBUTE)


def tuner_of(model: nn.Module) -> Any:
    """The AdapterModel behind a PeftModel, an injected model, or the AdapterModel itself."""
    if isinstance(model, AdapterModel):
        return model
    base = getattr(model, "base_model", None)
    if isinstance(base, AdapterModel):
        return base
    injected = injected_tuner(model)
    if isinstance(injected, AdapterModel):
        return injected
    raise TypeError(f"{type(model).__name__} holds no grafting adapters")


def injected_only(model: nn.Module) -> bool:
    """True when ``model`` is a model ``inject_adapter_in_model`` changed (not a PeftModel or tuner).

    Its adapter keys lack ``base_model.model.``: the model is its own root, as in PEFT.
    """
    try:
        tuner = tuner_of(model)
    except TypeError:
        return False
    return tuner is injected_tuner(model) and tuner is not model and getattr(model, "base_model", None) is not tuner


@attrs.frozen
class Slot:
    """Where one saved tensor lives: a module and the attribute name on it."""

    module: nn.Module
    attr: str
    device: torch.device = attrs.field(factory=lambda: torch.device("cpu"))

    def get(self) -> torch.Tensor:
        return getattr(self.module, self.attr)


def _device_of(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        if not tensor.is_meta:
            return tensor.device
    return torch.device("cpu")


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


def embedding_slots(tuner: Any, adapter_name: str, adapted_only: bool = False) -> dict[str, Slot]:
    """The input and output embedding weights, keyed as PEFT saves them with ``save_embedding_layers``.

    PEFT writes them (under ``<path>.<peft_base_path>`` for an adapted embedding: ``base_layer``, or where
    the layer's adapter says PEFT's module keeps the wrapped layer) so that a resized vocabulary comes
    back (see grafting.io.save_embeddings for when); a file that holds them loads them into the base model.
    ``adapted_only``: only the embedding layers wrapped where PEFT's tuner layers keep the base layer
    (``base_layer``), the ones a config that targets embeddings adapts.
    """
    prefix = MODEL_LEVEL_PREFIX if adapter_name in tuner.model_adapters else PREFIX
    paths = {id(module): name for name, module in tuner.model.named_modules()}
    slots: dict[str, Slot] = {}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(tuner.model, getter, None)
        emb = fn() if callable(fn) else None
        if not isinstance(emb, nn.Module) or id(emb) not in paths:
            continue
        base: nn.Module = emb.base_layer if isinstance(emb, AdaptedLayer) else emb
        if not isinstance(getattr(base, "weight", None), torch.Tensor):
            continue
        if isinstance(emb, AdaptedLayer):
            inner = _peft_base_path(emb, adapter_name)
            if adapted_only and inner != "base_layer":
                continue
            path = f"{logical_path(tuner.model, paths[id(emb)])}.{inner}"
        elif adapted_only:
            continue
        else:
            path = logical_path(tuner.model, paths[id(emb)])
        slots[f"{prefix}{path}.weight"] = Slot(base, "weight", _device_of(base))
    return slots


def _peft_base_path(layer: Any, adapter_name: str) -> str:
    """Where PEFT keeps ``layer``'s wrapped layer: the ``peft_base_path`` of its adapter ``adapter_name``, else of its first."""
    adapters = layer.adapters
    adapter = adapters[adapter_name] if adapter_name in adapters else next(iter(adapters.values()), None)
    return getattr(adapter, "peft_base_path", "base_layer")


#: Path segments of grafting's wrappers that hold adapter copies, not base tensors.
_WRAPPER_PARTS = ("adapters", "modules_to_save", "original_module")


def base_bias_slots(tuner: Any, adapter_name: str) -> dict[str, Slot]:
    """The base model's biases, keyed as PEFT saves them with ``bias="all"``.

    A file that holds them loads them whatever the loading config's ``bias``
    option says, as PEFT does (its loader takes every key that names a model tensor).
    """
    prefix = MODEL_LEVEL_PREFIX if adapter_name in tuner.model_adapters else PREFIX
    slots: dict[str, Slot] = {}
    for name, param in tuner.model.named_parameters():
        owner_path, _, attr = name.rpartition(".")
        if attr != "bias" or any(f".{part}." in f".{name}" for part in _WRAPPER_PARTS):
            continue
        owner = tuner.model.get_submodule(owner_path) if owner_path else tuner.model
        key = f"{prefix}{logical_path(tuner.model, owner_path)}.{attr}" if owner_path else f"{prefix}{attr}"
        slots[key] = Slot(owner, attr, param.device)
    return slots


def base_slots(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, Slot]]:
    """The base model's tensors under their original names: wrappers seen through, adapters left out."""

    if isinstance(module, AdaptedLayer):
        yield from base_slots(module.base_layer, prefix)
        return
    if isinstance(module, ModulesToSaveWrapper):
        yield from base_slots(module.original_module, prefix)
        return
    for name, param in module._parameters.items():
        if param is not None:
            yield prefix + name, Slot(module, name, param.device)
    for name, buffer in module._buffers.items():
        if buffer is not None and name not in module._non_persistent_buffers_set:
            yield prefix + name, Slot(module, name, buffer.device)
    for name, child in module._modules.items():
        if child is not None:
            yield from base_slots(child, f"{prefix}{name}.")
