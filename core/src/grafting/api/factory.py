"""``get_peft_model`` and ``inject_adapter_in_model``: adapters into a user's model, wrapped or in place."""

from __future__ import annotations

import warnings

import attrs
import torch
from torch import nn

from grafting.api.peft_model import PeftModel
from grafting.api.saving import DEFAULT
from grafting.config.adapter_config import AdapterConfig
from grafting.errors import ConfigError, GraftingWarning, TargetNotFoundError
from grafting.io.state_dict import attach_tuner, injected_tuner
from grafting.model.matching import candidate_modules, find_targets
from grafting.model.tuner import AdapterModel
from grafting.registry.plugins import get_method, get_registry


def get_peft_model(
    model: nn.Module,
    peft_config: AdapterConfig,
    adapter_name: str = DEFAULT,
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap ``model`` with a new adapter from ``peft_config``; the class follows ``task_type``.

    As in PEFT, ``peft_config`` is the config the model keeps: its
    ``base_model_name_or_path`` becomes the model's name (a warning says so when
    that renames it; a model without a name keeps the config's) and ``revision``
    is written into it.
    """
    name = model.__dict__.get("name_or_path") or None
    if name is not None:
        old = peft_config.base_model_name_or_path
        if old is not None and old != name:
            warnings.warn(
                f"the config's base_model_name_or_path {old!r} is replaced by the model's name {name!r}; the saved"
                " adapter names that base model",
                GraftingWarning,
                stacklevel=2,
            )
        peft_config.base_model_name_or_path = name
    if revision is not None:
        if peft_config.revision is not None and peft_config.revision != revision:
            warnings.warn(
                f"the config's revision {peft_config.revision!r} is replaced by revision={revision!r}",
                GraftingWarning,
                stacklevel=2,
            )
        peft_config.revision = revision
    klass = PeftModel.class_for(peft_config.task_type, mixed=mixed)
    return klass(
        model,
        peft_config,
        adapter_name,
        autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
        mixed=mixed,
    )


def inject_adapter_in_model(
    peft_config: AdapterConfig,
    model: nn.Module,
    adapter_name: str = DEFAULT,
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Put adapters into ``model`` in place, without a PeftModel wrapper; returns ``model``.

    The adapters' tuner stays reachable from ``model`` (a plain attribute, so
    ``model.state_dict()`` is unchanged), so ``get_peft_model_state_dict(model)``
    and ``set_peft_model_state_dict(model, sd)`` work on it with PEFT's keys
    (without the ``base_model.model.`` prefix). With ``state_dict``, the
    modules its keys name are adapted instead of the config's targets (its
    values are not loaded). ``low_cpu_mem_usage`` creates the adapter on the
    meta device, to be filled by ``set_peft_model_state_dict``.
    """
    if peft_config.is_prompt_learning:
        raise ConfigError(
            f"inject_adapter_in_model cannot add a {peft_config.peft_type} adapter: it acts on the model's inputs,"
            " so it needs get_peft_model"
        )
    tuner = injected_tuner(model)
    if tuner is None:
        tuner = AdapterModel(model, mixed=True)
    if state_dict is not None:
        peft_config = targets_from_state_dict(peft_config, model, state_dict)
    tuner.add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
    attach_tuner(model, tuner)
    return model


def targets_from_state_dict(
    config: AdapterConfig, model: nn.Module, state_dict: dict[str, torch.Tensor]
) -> AdapterConfig:
    """``config`` aimed at the modules that ``state_dict``'s keys hold adapter tensors for (PEFT's rule)."""
    modules = dict(candidate_modules(model))
    targets: set[str] = set()
    for key in state_dict:
        key = key.removeprefix("base_model.model.")
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):  # the longest module name the key starts with
            name = ".".join(parts[:cut])
            if name in modules:
                rest = ".".join(parts[cut:])
                if rest not in dict(modules[name].named_parameters()) | dict(modules[name].named_buffers()):
                    targets.add(name)  # an adapter tensor, not one of the module's own (modules_to_save)
                break
    if not targets:
        raise TargetNotFoundError("inject_adapter_in_model: the state_dict's keys name no module of the model")
    method = get_method(str(config.peft_type))
    defaults = get_registry().call(method, "grafting_default_target_modules", config=config, model=model)
    try:
        from_config = set(find_targets(model, config, defaults))
    except TargetNotFoundError:
        from_config = set()
    if from_config != targets:
        warnings.warn(
            "inject_adapter_in_model: the state_dict adapts other modules than the config's target_modules;"
            f" following the state_dict (config only: {sorted(from_config - targets)},"
            f" state_dict only: {sorted(targets - from_config)})",
            RuntimeWarning,
            stacklevel=3,
        )
    return attrs.evolve(
        config, target_modules=sorted(targets), layers_to_transform=None, layers_pattern=None, exclude_modules=None
    )


__all__ = ["get_peft_model", "inject_adapter_in_model", "targets_from_state_dict"]
