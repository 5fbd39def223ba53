"""``get_layer_status`` / ``get_model_status``: PEFT's troubleshooting view of which adapters sit where, in PEFT's fields.

Each adapted layer (and each ``modules_to_save`` copy holder) reports its adapters: enabled,
active, merged, whether their parameters train (``"irregular"`` when only some do) and on which
device types they live; the model status folds the layers' answers, ``"irregular"`` where they disagree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, Literal, cast

from torch import nn

from grafting.api.peft_model import PeftModel
from grafting.model.layer import AdaptedLayer
from grafting.model.modules_to_save import ModulesToSaveWrapper

Irregular = Literal["irregular"]


@dataclasses.dataclass
class TunerLayerStatus:
    """One adapted layer, as PEFT's ``TunerLayerStatus`` describes it."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None = None


@dataclasses.dataclass
class TunerModelStatus:
    """The whole model, as PEFT's ``TunerModelStatus`` describes it."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | Irregular | None = None


def _fold(values: Iterable[bool | Irregular]) -> bool | Irregular:
    values = list(values)
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    root = model.base_model if isinstance(model, PeftModel) else model
    return [(n, m) for n, m in root.named_modules() if isinstance(m, AdaptedLayer | ModulesToSaveWrapper)]


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The status of every adapted layer of ``model`` (a ``PeftModel`` or a model with adapters injected).

    A ``ValueError`` when it holds none (only input-level adapters, or none at all), as in PEFT.
    """
    found = []
    for name, module in _layers(model):
        active: list[str]
        if isinstance(module, AdaptedLayer):
            holders: dict[str, nn.Module] = dict(module.adapters.items())
            active, merged = list(module.active), list(module.merged)
        else:
            wrapper = cast(ModulesToSaveWrapper, module)
            holders = dict(wrapper.modules_to_save.items())
            active, merged = ([wrapper.active] if wrapper.active is not None else []), []
        params = {key: list(holder.parameters()) for key, holder in holders.items()}
        found.append(
            TunerLayerStatus(
                name=name,
                module_type=type(module).__name__,
                enabled=not bool(module.disabled),
                active_adapters=active,
                merged_adapters=merged,
                requires_grad={k: _fold(p.requires_grad for p in ps) for k, ps in params.items() if ps},
                available_adapters=sorted(holders),
                devices={k: sorted({p.device.type for p in ps}) for k, ps in params.items() if ps},
                quantization_backend=None,
            )
        )
    if not found:
        raise ValueError(
            "No adapter layers found in the model, please ensure that it's a PEFT model or that you have PEFT adapters "
            "injected in the model."
        )
    return found


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The status of ``model``'s adapters as a whole; fields the layers disagree on are ``"irregular"``."""
    layers = get_layer_status(model)
    if isinstance(model, PeftModel):
        trainable, total = model.get_nb_trainable_parameters()
        base_type, adapter_type = type(model.get_base_model()).__name__, type(model.base_model).__name__
        peft_types = {k: str(getattr(c.peft_type, "value", c.peft_type)) for k, c in model.peft_config.items()}
    else:
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        base_type, adapter_type, peft_types = type(model).__name__, "None", {}
    enabled = {s.enabled for s in layers}
    actives = {tuple(s.active_adapters) for s in layers}
    merged_somewhere = {n for s in layers for n in s.merged_adapters}
    merged: list[str] | Irregular = sorted(merged_somewhere)
    if any((set(s.available_adapters) - set(s.merged_adapters)) & merged_somewhere for s in layers):
        merged = "irregular"
    keys = {k for s in layers for k in s.requires_grad}
    devices: dict[str, set[str]] = {}
    for status in layers:
        for key, types in status.devices.items():
            devices.setdefault(key, set()).update(types)
    return TunerModelStatus(
        base_model_type=base_type,
        adapter_model_type=adapter_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(actives.pop()) if len(actives) == 1 else "irregular",
        merged_adapters=merged,
        requires_grad={k: _fold(s.requires_grad[k] for s in layers if k in s.requires_grad) for k in sorted(keys)},
        available_adapters=sorted({n for s in layers for n in s.available_adapters}),
        devices={k: sorted(v) for k, v in devices.items()},
        quantization_backend=None,
    )


__all__: list[Any] = ["TunerLayerStatus", "TunerModelStatus", "get_layer_status", "get_model_status"]
