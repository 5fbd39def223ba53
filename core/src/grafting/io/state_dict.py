"""Adapter weights in PEFT's key layout: gather them from a model, put them back (the public functions)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from grafting.errors import BaseStateDictError, GraftingWarning, StateDictKeyError
from grafting.io.load_plan import LoadResult, plan_peft_model_state_dict
from grafting.io.save_embeddings import saves_embeddings
from grafting.io.slots import PREFIX, Slot, adapter_slots, base_slots, embedding_slots, injected_only, tuner_of


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
    tuner.require_adapter(adapter_name)
    slots = adapter_slots(model, adapter_name)
    save, targeted = saves_embeddings(save_embedding_layers, tuner.peft_config[adapter_name], tuner.model)
    if save and not callable(getattr(tuner.model, "get_input_embeddings", None)):
        warnings.warn(
            f"save_embedding_layers: {type(tuner.model).__name__} has no get_input_embeddings (not a transformers"
            " model), so no embedding layer is saved",
            GraftingWarning,
            stacklevel=2,
        )
    elif save:
        slots.update(embedding_slots(tuner, adapter_name, adapted_only=targeted))
    if state_dict is None:
        out = {key: full_tensor(slot.get()) for key, slot in slots.items()}
    else:
        out = _from_state_dict(model, slots, state_dict, adapter_name)
    out = tuner.peft_config[adapter_name].tensors_to_save(out)
    if adapter_name in tuner.model_adapters:
        out.update({k: full_tensor(v) for k, v in tuner.model_adapters[adapter_name].peft_state_dict().items()})
    if injected_only(model):
        out = {key.removeprefix(PREFIX): value for key, value in out.items()}
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
        if found is None and slot.attr not in {*slot.module._parameters, *slot.module._buffers}:
            out[key] = full_tensor(slot.get())  # a view of another tensor (a tied head's factors): from the model
            continue
        if found is None:
            raise StateDictKeyError(
                f"the given state_dict has no tensor for adapter {adapter_name!r}'s {key}"
                f" (looked for {candidates or 'a key of the model'}; is it the whole model's state dict, keyed as"
                f" {type(model).__name__}.state_dict()?)"
            )
        out[key] = state_dict[found].detach()
    return out


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> LoadResult:
    """Load PEFT-keyed tensors into adapter ``adapter_name``.

    Keys, shapes, dtypes and values are checked for every tensor before any is written
    (:func:`plan_peft_model_state_dict`), so a bad state dict leaves the model as it was. Meta tensors
    (``low_cpu_mem_usage``) are materialized on their base layer's device. With
    ``ignore_mismatched_sizes`` tensors whose shape differs are skipped.
    """
    state = dict(peft_model_state_dict)
    if ignore_mismatched_sizes:
        slots = adapter_slots(model, adapter_name)
        for key in [k for k, v in state.items() if k in slots and isinstance(v, torch.Tensor)]:
            if tuple(slots[key].get().shape) != tuple(state[key].shape):
                del state[key]
    plan = plan_peft_model_state_dict(model, state, adapter_name)
    plan.apply()
    return plan.result


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict under the keys it had before adapters were added (adapter tensors left out)."""
    return {key: slot.get() for key, slot in base_slots(tuner_of(model).model)}


def set_base_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> LoadResult:
    """Load a state dict keyed as the plain base model into the base model under the adapters.

    With ``strict`` a missing or unexpected key is a ``RuntimeError`` (as
    ``load_state_dict`` and PEFT raise) and nothing is written.
    """
    slots = dict(base_slots(tuner_of(model).model))
    missing = [key for key in slots if key not in state_dict]
    unexpected = [key for key in state_dict if key not in slots]
    if strict and (missing or unexpected):
        raise BaseStateDictError(
            f"the state dict does not fit the base model: missing keys {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}"
        )
    for key, slot in slots.items():  # check every shape before writing anything
        if key in state_dict and tuple(state_dict[key].shape) != tuple(slot.get().shape):
            raise BaseStateDictError(
                f"{key} has shape {tuple(state_dict[key].shape)} in the state dict but {tuple(slot.get().shape)}"
                " in the base model"
            )
    with torch.no_grad():
        for key, slot in slots.items():
            if key in state_dict:
                slot.get().copy_(state_dict[key])
    return LoadResult(missing_keys=missing, unexpected_keys=unexpected)
