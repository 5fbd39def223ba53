"""Adapter weights in PEFT's key layout: gather them from a model, put them back."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import attrs
import torch
from torch import nn

from grafting.errors import AdapterLoadError, BaseStateDictError, GraftingWarning, StateDictKeyError
from grafting.io.save_embeddings import saves_embeddings
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


def _injected_only(model: nn.Module) -> bool:
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
    if adapter_name in tuner.model_adapters:
        out.update({k: full_tensor(v) for k, v in tuner.model_adapters[adapter_name].peft_state_dict().items()})
    if _injected_only(model):
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


#: Path segments of grafting's wrappers that hold adapter copies, not base tensors.
_WRAPPER_PARTS = ("adapters", "modules_to_save", "original_module")


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
    if _injected_only(model):  # PEFT's keys for an injected model start at the model itself
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


def _base_slots(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, Slot]]:
    """The base model's tensors under their original names: wrappers seen through, adapters left out."""

    if isinstance(module, AdaptedLayer):
        yield from _base_slots(module.base_layer, prefix)
        return
    if isinstance(module, ModulesToSaveWrapper):
        yield from _base_slots(module.original_module, prefix)
        return
    for name, param in module._parameters.items():
        if param is not None:
            yield prefix + name, Slot(module, name, param.device)
    for name, buffer in module._buffers.items():
        if buffer is not None and name not in module._non_persistent_buffers_set:
            yield prefix + name, Slot(module, name, buffer.device)
    for name, child in module._modules.items():
        if child is not None:
            yield from _base_slots(child, f"{prefix}{name}.")


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict under the keys it had before adapters were added (adapter tensors left out)."""
    return {key: slot.get() for key, slot in _base_slots(tuner_of(model).model)}


def set_base_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> LoadResult:
    """Load a state dict keyed as the plain base model into the base model under the adapters.

    With ``strict`` a missing or unexpected key is a ``RuntimeError`` (as
    ``load_state_dict`` and PEFT raise) and nothing is written.
    """
    slots = dict(_base_slots(tuner_of(model).model))
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
