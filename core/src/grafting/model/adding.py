"""Adding an adapter: check the request, create every piece, then install them all (or nothing).

``AdapterModel.add_adapter`` runs three steps. :func:`check_new_adapter` refuses a bad name or
config; :func:`create_adapter` resolves the config (task heads, ``for_model``, weight tying),
matches the targets and asks the method's plugin for its shared state and one adapter per target
(or its model-level adapter), touching nothing of the model; :func:`install` puts the pieces in
place only after every creation succeeded, so a failure leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import nn

from grafting.config.adapter_config import AdapterConfig
from grafting.config.tasks import task_of
from grafting.config.validators import check_adapter_name
from grafting.errors import (
    AdapterStateError,
    BeyondPeftWarning,
    ConfigError,
    PluginError,
    TargetNotFoundError,
    UnsupportedLayerError,
)
from grafting.model.layer import AdaptedLayer
from grafting.model.matching import (
    candidate_modules,
    find_targets,
    name_matches,
    physical_path,
    warn_unmatched_patterns,
)
from grafting.model.modules_to_save import ModulesToSaveWrapper
from grafting.model.tying import WeightTying, plan_weight_tying
from grafting.protocol import AdapterContext, LayerAdapter, ModelAdapter, SharedState
from grafting.registry.method import Method
from grafting.registry.plugins import get_method, get_registry

if TYPE_CHECKING:
    from grafting.model.tuner import AdapterModel


@attrs.define
class Creation:
    """What one ``add_adapter`` call built, not yet in the model."""

    layer_adapters: list[tuple[str, LayerAdapter]] = attrs.Factory(list)  #: (logical path, adapter), model order
    shared: SharedState | None = None
    model_adapter: ModelAdapter | None = None
    saved: list[str] = attrs.Factory(list)  #: the modules_to_save paths that get a trainable copy
    tied_copies: dict[str, str] = attrs.Factory(dict)  #: partner path -> the embedding path whose copy it shares


def check_new_adapter(tuner: AdapterModel, adapter_name: str, config: AdapterConfig) -> None:
    """Refuse a bad or taken name, a config that is not grafting's, or a second method in a single-method model."""
    check_adapter_name(adapter_name)
    if adapter_name in tuner.peft_config:
        raise AdapterStateError(f"the model already holds an adapter named {adapter_name!r}")
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"expected a grafting adapter config, got {type(config).__name__}")
    if not tuner.mixed:
        others = {c.peft_type for c in tuner.peft_config.values()} - {config.peft_type}
        if others:
            raise AdapterStateError(
                f"this model holds {sorted(others)} adapters; adding a {config.peft_type} adapter needs a mixed model "
                "(get_peft_model(..., mixed=True))"
            )


#: Set while PeftModel.from_pretrained / load_adapter load without ``low_cpu_mem_usage``: PEFT then builds
#: each adapter for real (its random initialisation drawn from torch's global generator) before the file
#: overwrites it. grafting builds on the meta device and, while this is set, also builds each adapter once
#: for real and drops it, so a seeded script's generator continues where PEFT's would.
_DRAW_AS_PEFT: contextvars.ContextVar[bool] = contextvars.ContextVar("grafting_draw_as_peft", default=False)


@contextlib.contextmanager
def drawing_as_peft(enabled: bool = True) -> Iterator[None]:
    """Within: adapters created on the meta device for loading draw from torch's generator as PEFT's loading does."""
    token = _DRAW_AS_PEFT.set(enabled)
    try:
        yield
    finally:
        _DRAW_AS_PEFT.reset(token)


class _Creator:
    """Calls the method's create hooks, on the meta device when loading; replays them for real and drops the
    result where PEFT's loading would draw from torch's generator (:func:`drawing_as_peft`)."""

    def __init__(self, method: Method, low_cpu_mem_usage: bool) -> None:
        self.method = method
        self.meta = low_cpu_mem_usage
        self.replay = low_cpu_mem_usage and _DRAW_AS_PEFT.get()
        self.shadows: dict[int, AdapterContext] = {}  # the replays' own contexts: the real calls' state is untouched

    def __call__(self, hook: str, **kwargs: Any) -> Any:
        registry = get_registry()
        if self.replay:
            context = kwargs["context"]
            shadow = self.shadows.setdefault(id(context), attrs.evolve(context, state={}))
            shadow.shared = context.shared
            registry.call(self.method, hook, **{**kwargs, "context": shadow})
        with torch.device("meta") if self.meta else contextlib.nullcontext():
            return registry.call(self.method, hook, **kwargs)


def create_adapter(
    model: nn.Module,
    adapter_name: str,
    config: AdapterConfig,
    *,
    autocast_adapter_dtype: bool,
    low_cpu_mem_usage: bool,
) -> tuple[AdapterConfig, Creation]:
    """The config the model keeps and every piece of the new adapter; the model is left unchanged."""
    method = get_method(config.peft_type)
    derived, tying = plan_weight_tying(with_task_heads(config).for_model(model), model)
    config = config if derived == config else derived  # the caller's own object when nothing was filled in
    config.validate_for_model(model)
    create = _Creator(method, low_cpu_mem_usage)
    creation = Creation()
    if method.level == "layer":
        defaults = get_registry().call(method, "grafting_default_target_modules", config=config, model=model)
        targets = layer_targets(model, config, defaults, tying)
        context = AdapterContext(config, model, adapter_name, dict(targets))
        creation.shared = create(
            "grafting_create_shared_state",
            config=config,
            model=model,
            adapter_name=adapter_name,
            targets=dict(targets),
            context=context,
        )
        context.shared = creation.shared
        if creation.shared is not None:
            clash = [k for k in creation.shared.state_dict() if k.split(".")[0] == "model"]
            if clash:
                raise PluginError(f"{method.name}: a shared state may not name tensors model.*, got {clash}")
            place(creation.shared, next(iter(targets.values())), autocast_adapter_dtype)
        for path, base in targets.items():
            adapter = create(
                "grafting_create_layer_adapter",
                config=config,
                base_layer=base,
                adapter_name=adapter_name,
                module_name=path,
                model=model,
                shared=creation.shared,
                context=context,
            )
            if adapter is None:
                raise UnsupportedLayerError(
                    f"{config.peft_type} adapter {adapter_name!r}: {path} is a {type(base).__name__}, which no "
                    f"installed plugin can adapt with {config.peft_type}"
                )
            place(adapter, base, autocast_adapter_dtype)
            creation.layer_adapters.append((path, adapter))
        warn_beyond_peft(config, adapter_name, creation)
        if config.target_modules is None and defaults is not None:
            # saved as the resolved names, as PEFT writes them (vLLM, SGLang read them)
            config = attrs.evolve(config, target_modules=defaults)
    else:
        creation.model_adapter = create(
            "grafting_create_model_adapter",
            config=config,
            model=model,
            adapter_name=adapter_name,
            context=AdapterContext(config, model, adapter_name),
        )
        if creation.model_adapter is None:
            raise PluginError(f"the {method.name} plugin built no model adapter for {type(model).__name__}")
        place(creation.model_adapter, model, autocast_adapter_dtype)
    creation.saved = modules_to_save_paths(model, config, [path for path, _ in creation.layer_adapters])
    if tying is not None and tying.option == "modules_to_save" and tying.embedding in creation.saved:
        creation.tied_copies = {p: tying.embedding for p in tying.partners}
        creation.saved = [p for p in creation.saved if p not in creation.tied_copies] + list(creation.tied_copies)
    return config, creation


def warn_beyond_peft(config: AdapterConfig, adapter_name: str, creation: Creation) -> None:
    """One :class:`BeyondPeftWarning` naming the layers whose adapters PEFT's version of the method refuses."""
    beyond = [path for path, adapter in creation.layer_adapters if not adapter.peft_loadable]
    if beyond:
        more = " …" if len(beyond) > 5 else ""
        warnings.warn(
            f"{config.peft_type} adapter {adapter_name!r} on {beyond[:5]}{more}: PEFT's {config.peft_type} refuses"
            " these layer types; grafting adapts, saves and loads them, PEFT cannot load the saved folder",
            BeyondPeftWarning,
            stacklevel=4,
        )


def layer_targets(
    model: nn.Module, config: AdapterConfig, defaults: list[str] | str | None, tying: WeightTying | None
) -> dict[str, nn.Module]:
    """{logical name: base layer} of every module the config adapts, in model order (tied partners last).

    ``defaults`` are the method's default target modules (its ``grafting_default_target_modules``).
    """
    found = find_targets(model, config, defaults)
    if tying is not None and tying.option == "target_modules" and tying.embedding in found:
        # the tied partners come last, after the embedding whose adapter they follow
        found = [p for p in found if p not in tying.partners] + list(tying.partners)
    warn_unmatched_patterns(config, found)
    targets: dict[str, nn.Module] = {}
    for path in found:
        module = model.get_submodule(physical_path(model, path))
        targets[path] = module.base_layer if isinstance(module, AdaptedLayer) else module
    return targets


def install(tuner: AdapterModel, adapter_name: str, creation: Creation) -> None:
    """Put every created piece into the model (wrapping the modules that are not wrapped yet)."""
    model = tuner.model
    for path, adapter in creation.layer_adapters:
        where = physical_path(model, path)  # after this loop's earlier installs
        module = model.get_submodule(where)
        if not isinstance(module, AdaptedLayer):
            module = AdaptedLayer(module)
            model.set_submodule(where, module)
        module.add_adapter(adapter_name, adapter)
        adapter.attach(module.base_layer)
    if creation.model_adapter is not None:
        tuner.model_adapters[adapter_name] = creation.model_adapter
    if creation.shared is not None:
        tuner.shared_states[adapter_name] = creation.shared
    for path in creation.saved:
        where = physical_path(model, path)
        wrapper = model.get_submodule(where)
        if not isinstance(wrapper, ModulesToSaveWrapper):
            wrapper = ModulesToSaveWrapper(wrapper)
            model.set_submodule(where, wrapper)
        tied = creation.tied_copies.get(path)
        tied_to = model.get_submodule(physical_path(model, tied)) if tied is not None else None
        wrapper.add_copy(adapter_name, tied_to=tied_to if isinstance(tied_to, ModulesToSaveWrapper) else None)


def with_task_heads(config: AdapterConfig) -> AdapterConfig:
    """``config`` with its task's heads (trained in full, as PEFT does) added to ``modules_to_save``."""
    task = task_of(config.task_type)
    heads = task.heads if task is not None else ()
    if not heads:
        return config
    current = list(config.modules_to_save or [])
    return attrs.evolve(config, modules_to_save=current + [h for h in heads if h not in current])


def modules_to_save_paths(model: nn.Module, config: AdapterConfig, targets: list[str] | None = None) -> list[str]:
    """The outermost modules ``config.modules_to_save`` names (a head, not its submodules).

    A container (ModuleList, ModuleDict), the model's backbone or a module holding a layer an adapter
    adapts (``targets``: this adapter's) is refused: its copy would replace the layers the model indexes
    or adapts.
    """
    if not config.modules_to_save:
        return []
    found = [
        (n, m)
        for n, m in candidate_modules(model)
        if name_matches(n, config.modules_to_save) and not isinstance(m, AdaptedLayer)
    ]
    found = [(p, m) for p, m in found if not any(p.startswith(q + ".") for q, _ in found)]
    if not found:
        raise TargetNotFoundError(
            f"{type(config).__name__}: modules_to_save={config.modules_to_save!r} matches no module of the model"
        )
    backbone = getattr(model, "base_model", None)
    adapted = [p for p, m in candidate_modules(model) if isinstance(m, AdaptedLayer)] + list(targets or [])
    for path, module in found:
        inner = next((t for t in adapted if t.startswith(path + ".")), None)
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            why = "a container of layers"
        elif module is backbone and backbone is not model:
            why = "the model's backbone"
        else:
            why = f"it holds {inner}, which an adapter adapts" if inner else ""
        if why:
            raise ConfigError(
                f"{type(config).__name__}.modules_to_save={config.modules_to_save!r}: {path} cannot be copied"
                f" and trained ({why}); name a head or an embedding"
            )
    return [p for p, _ in found]


def base_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    """The device and floating dtype of the first floating tensor of ``module`` (its first tensor's device otherwise)."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    for tensor in module.parameters():
        return tensor.device, None
    return torch.device("cpu"), None


def place(adapter: nn.Module, base: nn.Module, autocast_adapter_dtype: bool) -> None:
    """Put a new adapter on its base's device; float32 unless the base is float64 or autocast is off.

    Meta tensors (an adapter built for loading) stay on meta, only their dtype changes.
    """
    device, dtype = base_device_dtype(base)
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    if dtype not in floats or (autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16)):
        target = torch.float32
    else:
        target = dtype

    def convert(t: torch.Tensor) -> torch.Tensor:
        t = t.to(dtype=target) if t.is_floating_point() else t
        return t if t.is_meta else t.to(device=device)

    adapter._apply(convert)
