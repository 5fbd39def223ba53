"""Loading adapter tensors in two steps: a plan that checks every key, shape and dtype, then its apply.

A plan touches nothing; :meth:`LoadPlan.apply` changes the model only after every check passed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import attrs
import torch
from torch import nn

from grafting.errors import AdapterLoadError
from grafting.io.slots import (
    MODEL_LEVEL_PREFIX,
    PREFIX,
    Slot,
    adapter_slots,
    base_bias_slots,
    embedding_slots,
    injected_only,
    tuner_of,
)
from grafting.model.layer import AdaptedLayer
from grafting.model.matching import logical_path


class LoadResult(NamedTuple):
    """Adapter tensors the file did not provide, and keys of the file that fit nothing (torch's order)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


#: Floating dtypes a file's tensor may be cast from into a floating parameter (any of them to any other).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def checked_value(key: str, value: Any, current: torch.Tensor, *, where: str) -> torch.Tensor:
    """``value`` from a file, cast for the model tensor ``current``; AdapterLoadError if it does not fit.

    The casting rule: a floating-point model tensor takes a float16, bfloat16, float32 or float64 tensor,
    cast to its own dtype (as ``torch.nn.Module.load_state_dict`` does); integer, bool and complex tensors
    are refused, never cast. Any other model tensor (a quantized weight) takes only its own dtype. Every
    value must be finite, before and after the cast (a float32 1e6 does not fit a float16 parameter).
    """
    if not isinstance(value, torch.Tensor):
        raise AdapterLoadError(f"{where}: {key} is a {type(value).__name__}, not a tensor")
    if tuple(current.shape) != tuple(value.shape):
        raise AdapterLoadError(
            f"{where}: {key} has shape {tuple(value.shape)} in the file but {tuple(current.shape)} in the model"
            " (is the config's r or target set the one it was saved with?)"
        )
    if current.is_floating_point():
        if value.dtype not in FLOAT_DTYPES:
            raise AdapterLoadError(
                f"{where}: {key} is {value.dtype} in the file; the model's {current.dtype} tensor takes only"
                f" floating-point values ({', '.join(str(d).removeprefix('torch.') for d in FLOAT_DTYPES)})"
            )
        if not bool(torch.isfinite(value).all()):
            raise AdapterLoadError(f"{where}: {key} holds NaN or infinite values")
        cast = value.to(dtype=current.dtype)
        if not bool(torch.isfinite(cast).all()):
            raise AdapterLoadError(f"{where}: {key} has values too large for the model's {current.dtype}")
        return cast
    if value.dtype != current.dtype:
        raise AdapterLoadError(f"{where}: {key} is {value.dtype} in the file but {current.dtype} in the model")
    return value


@attrs.define
class LoadPlan:
    """What a load would write, checked in full before anything is: slots and their new values."""

    tuner: Any
    adapter_name: str
    writes: list[tuple[Slot, torch.Tensor]]
    model_level: dict[str, torch.Tensor]
    result: LoadResult
    unfilled_meta: list[str]

    def apply(self, after: Callable[[], None] | None = None) -> None:
        """Write every value, then call ``after`` (a last check); should either fail, every write is undone."""
        saved: list[tuple[Slot, torch.Tensor]] = []
        adapter = self.tuner.model_adapters[self.adapter_name] if self.model_level else None
        adapter_state = {k: v.clone() for k, v in adapter.state_dict().items()} if adapter is not None else None
        try:
            with torch.no_grad():
                for slot, value in self.writes:
                    current = slot.get()
                    if current.is_meta:
                        saved.append((slot, current))
                        new = value.to(device=slot.device)
                        if isinstance(current, nn.Parameter):
                            new = nn.Parameter(new, requires_grad=current.requires_grad)
                        setattr(slot.module, slot.attr, new)
                    else:
                        saved.append((slot, current.detach().clone()))
                        current.copy_(value)
                if adapter is not None:
                    adapter.load_peft_state_dict(self.model_level)
            self._check_read_back()
            if after is not None:
                after()
        except BaseException:
            with torch.no_grad():
                for slot, old in reversed(saved):
                    if old.is_meta:
                        setattr(slot.module, slot.attr, old)
                    else:
                        slot.get().copy_(old)
                if adapter is not None and adapter_state is not None:
                    adapter.load_state_dict(adapter_state, strict=False)
            raise

    def _check_read_back(self) -> None:
        """Every slot holds the value written to it: two keys for one tensor (a tied copy, a tied head's
        factors, which are views of the embedding's) must agree, or the load is undone."""
        for slot, value in self.writes:
            if not torch.equal(slot.get().detach(), value.to(slot.get().device)):
                storage = slot.get().untyped_storage().data_ptr()
                names = {s: k for k, s in adapter_slots(self.tuner, self.adapter_name).items()}
                keys = [names.get(s, s.attr) for s, _ in self.writes if s.get().untyped_storage().data_ptr() == storage]
                raise AdapterLoadError(
                    f"adapter {self.adapter_name!r}: the file's {' and '.join(keys)} are one tensor in the model"
                    " (tied weights) but hold different values; nothing was loaded"
                )


def plan_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, Any],
    adapter_name: str = "default",
    *,
    source: str = "state dict",
) -> LoadPlan:
    """Check every key, shape, dtype and value of a PEFT-keyed state dict against adapter ``adapter_name``.

    Nothing of the model changes here; :meth:`LoadPlan.apply` writes. A tensor that does not fit its
    slot is an :class:`AdapterLoadError` naming it (see :func:`checked_value` for the dtype rule).
    """
    tuner = tuner_of(model)
    tuner.require_adapter(adapter_name)
    where = f"{source} (adapter {adapter_name!r})"
    state = dict(peft_model_state_dict)
    bad_keys = [k for k in state if not isinstance(k, str)]
    if bad_keys:
        raise AdapterLoadError(f"{where}: keys must be strings, got {bad_keys[:3]!r}")
    if injected_only(model):  # PEFT's keys for an injected model start at the model itself
        state = {k if k.startswith(MODEL_LEVEL_PREFIX) else PREFIX + k: v for k, v in state.items()}
    model_level: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    unfilled: list[str] = []
    if adapter_name in tuner.model_adapters:
        wanted = tuner.model_adapters[adapter_name].peft_state_dict()
        for key, like in wanted.items():
            if key in state:
                model_level[key] = checked_value(key, state.pop(key), like, where=where)
            else:
                missing.append(key)
    writes: list[tuple[Slot, torch.Tensor]] = []
    for key, slot in adapter_slots(model, adapter_name).items():
        if key not in state:
            missing.append(key)
            if slot.get().is_meta:
                unfilled.append(key)
            continue
        writes.append((slot, checked_value(key, state.pop(key), slot.get(), where=where)))
    _drop_wrapper_copies(tuner, adapter_name, state)
    embedding: dict[str, tuple[Slot, torch.Tensor]] = {}
    for key, slot in embedding_slots(tuner, adapter_name).items():  # optional: only if the file holds them
        if key in state:
            embedding[key] = (slot, checked_value(key, state.pop(key), slot.get(), where=where))
    _check_tied(embedding, where)
    _check_tied_to_base(tuner, adapter_name, embedding, where)
    writes += list(embedding.values())
    for key, slot in base_bias_slots(tuner, adapter_name).items():  # loaded if the file holds them, as PEFT does
        if key in state:
            writes.append((slot, checked_value(key, state.pop(key), slot.get(), where=where)))
    return LoadPlan(
        tuner,
        adapter_name,
        writes,
        model_level,
        LoadResult(missing_keys=missing, unexpected_keys=sorted(state)),
        unfilled,
    )


def _check_tied(embedding: dict[str, tuple[Slot, torch.Tensor]], where: str) -> None:
    """Two keys for one tied tensor (GPT-2's lm_head and wte) must hold the same values, or neither loads."""
    by_tensor: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for key, (slot, value) in embedding.items():
        by_tensor.setdefault(id(slot.get()), []).append((key, value))
    for items in by_tensor.values():
        (first, value), rest = items[0], items[1:]
        for key, other in rest:
            if not torch.equal(value, other):
                raise AdapterLoadError(
                    f"{where}: {first} and {key} are one tied tensor in the model, but the file holds different"
                    " values for them (untie the model's embeddings to load both)"
                )


def _check_tied_to_base(
    tuner: Any, adapter_name: str, embedding: dict[str, tuple[Slot, torch.Tensor]], where: str
) -> None:
    """A file may change an embedding tied to the output head (GPT-2) only if the adapter targets an embedding.

    Otherwise the key is a saved head the config does not account for (no ``modules_to_save``), and
    loading it would silently change both the head and the input embeddings.
    """
    modules = [
        getattr(tuner.model, g)() for g in ("get_input_embeddings", "get_output_embeddings") if hasattr(tuner.model, g)
    ]
    modules = [m for m in modules if m is not None]
    if any(isinstance(m, AdaptedLayer) and adapter_name in m.adapters for m in modules):
        return
    bases = [m.base_layer if isinstance(m, AdaptedLayer) else m for m in modules]
    weights = [getattr(b, "weight", None) for b in bases]
    tied = len(weights) == 2 and weights[0] is not None and weights[0] is weights[1]
    for key, (slot, value) in embedding.items():
        if tied and slot.get() is weights[0] and not torch.equal(value.to(slot.get().device), slot.get()):
            raise AdapterLoadError(
                f"{where}: {key} would change the model's input embeddings and output head, which are tied, but"
                " the adapter targets no embedding layer (a saved head its config does not declare); refusing"
            )


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
