"""AdapterModel: puts adapters of any method into a model and manages their state."""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import torch
from torch import nn

from grafting.config.adapter_config import AdapterConfig, TaskType
from grafting.config.validators import check_adapter_name
from grafting.errors import (
    ActiveAdaptersError,
    AdapterNotFoundError,
    AdapterStateError,
    BeyondPeftWarning,
    GraftingWarning,
    MergeError,
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
from grafting.model.tying import plan_weight_tying
from grafting.protocol import AdapterContext, LayerAdapter, ModelAdapter, SharedState
from grafting.registry.plugins import get_method, get_registry

#: Heads trained in full for these task types, as PEFT does.
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


TASK_HEADS: dict[str, list[str]] = {
    TaskType.SEQ_CLS.value: ["classifier", "score"],
    TaskType.TOKEN_CLS.value: ["classifier", "score"],
    TaskType.QUESTION_ANS.value: ["qa_outputs"],
}


def _base_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    for tensor in module.parameters():
        return tensor.device, None
    return torch.device("cpu"), None


def _place(adapter: nn.Module, base: nn.Module, autocast_adapter_dtype: bool) -> None:
    """Put a new adapter on its base's device; float32 unless the base is float64 or autocast is off.

    Meta tensors (an adapter built for loading) stay on meta, only their dtype changes.
    """
    device, dtype = _base_device_dtype(base)
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    if dtype not in floats or (autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16)):
        target = torch.float32
    else:
        target = dtype

    def convert(t: torch.Tensor) -> torch.Tensor:
        t = t.to(dtype=target) if t.is_floating_point() else t
        return t if t.is_meta else t.to(device=device)

    adapter._apply(convert)


def _unmerge_for(layer: AdaptedLayer, names: list[str]) -> bool:
    """Whether activating ``names`` must unmerge ``layer``: a merged adapter leaves the active set, or an
    adapter that reads the layer's own weight (DoRA) would run unmerged beside merged ones."""
    if set(layer.merged) - set(names):
        return True
    return bool(layer.merged) and any(
        n in layer.adapters and n not in layer.merged and getattr(layer.adapters[n], "reads_base_weight", False)
        for n in names
    )


class AdapterModel(nn.Module):
    """The method-agnostic tuner that ``PeftModel.base_model`` is.

    ``model`` is the user's model with adapted layers in place;
    ``model_adapters`` holds model-level adapters; ``peft_config`` maps
    adapter names to configs.
    """

    def __init__(self, model: nn.Module, *, mixed: bool = False) -> None:
        super().__init__()
        self.model = model
        self.model_adapters = nn.ModuleDict()
        self.shared_states = nn.ModuleDict()  # SharedState by adapter name (layer methods that share tensors)
        self.peft_config: dict[str, AdapterConfig] = {}
        self.active_adapters: list[str] = []
        self.trainable_adapters: set[str] = set()  # whose parameters require grad (PEFT: set_adapter trains)
        self.mixed = mixed
        self.disabled = False  # the base is frozen by the first add_adapter that succeeds

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # -- traversal ------------------------------------------------------------------
    def adapted_layers(self) -> Iterator[tuple[str, AdaptedLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, AdaptedLayer):
                yield name, module

    def save_wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        for name, module in self.model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                yield name, module

    def adapter_modules(self, name: str) -> Iterator[tuple[str, nn.Module]]:
        """(path, module) of everything adapter ``name`` added: layer adapters, copies, shared and model state."""
        for path, layer in self.adapted_layers():
            if name in layer.adapters:
                yield f"model.{path}.adapters.{name}", layer.adapters[name]
        for path, wrapper in self.save_wrappers():
            if name in wrapper.modules_to_save:
                yield f"model.{path}.modules_to_save.{name}", wrapper.modules_to_save[name]
        if name in self.shared_states:
            yield f"shared_states.{name}", self.shared_states[name]
        if name in self.model_adapters:
            yield f"model_adapters.{name}", self.model_adapters[name]

    def _require(self, name: str) -> None:
        if name not in self.peft_config:
            raise AdapterNotFoundError(  # PEFT's sentence first: code matches it
                f"Adapter {name} not found. No adapter named {name!r}; the model holds {sorted(self.peft_config)}"
            )

    # -- adding -----------------------------------------------------------------------
    def add_adapter(
        self,
        adapter_name: str,
        config: AdapterConfig,
        *,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        """Create adapter ``adapter_name`` from ``config``; on any error the model is unchanged."""
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise AdapterStateError(f"the model already holds an adapter named {adapter_name!r}")
        if not isinstance(config, AdapterConfig):
            raise TypeError(f"expected a grafting adapter config, got {type(config).__name__}")
        if not self.mixed:
            others = {c.peft_type for c in self.peft_config.values()} - {config.peft_type}
            if others:
                raise AdapterStateError(
                    f"this model holds {sorted(others)} adapters; adding a {config.peft_type} adapter needs a mixed model "
                    "(get_peft_model(..., mixed=True))"
                )
        method = get_method(config.peft_type)
        derived, tying = plan_weight_tying(self._with_task_heads(config).for_model(self.model), self.model)
        config = config if derived == config else derived  # the caller's own object when nothing was filled in
        config.validate_for_model(self.model)
        registry = get_registry()
        device_ctx = torch.device("meta") if low_cpu_mem_usage else contextlib.nullcontext()
        replay = low_cpu_mem_usage and _DRAW_AS_PEFT.get()

        shadows: dict[int, AdapterContext] = {}  # the replays' own contexts: the real calls' state is untouched

        def create(hook: str, **kwargs: Any) -> Any:
            if replay:  # built for real and dropped: torch's generator advances as PEFT's loading advances it
                context = kwargs["context"]
                shadow = shadows.setdefault(id(context), attrs.evolve(context, state={}))
                shadow.shared = context.shared
                registry.call(method, hook, **{**kwargs, "context": shadow})
            with device_ctx:
                return registry.call(method, hook, **kwargs)

        created: list[tuple[str, LayerAdapter]] = []
        model_adapter: ModelAdapter | None = None
        shared: SharedState | None = None
        if method.level == "layer":
            defaults = registry.call(method, "grafting_default_target_modules", config=config, model=self.model)
            targets: dict[str, nn.Module] = {}
            found = find_targets(self.model, config, defaults)
            if tying is not None and tying.option == "target_modules" and tying.embedding in found:
                # the tied partners come last, after the embedding whose adapter they follow
                found = [p for p in found if p not in tying.partners] + list(tying.partners)
            warn_unmatched_patterns(config, found)
            for path in found:
                module = self.model.get_submodule(physical_path(self.model, path))
                targets[path] = module.base_layer if isinstance(module, AdaptedLayer) else module
            context = AdapterContext(config, self.model, adapter_name, dict(targets))
            shared = create(
                "grafting_create_shared_state",
                config=config,
                model=self.model,
                adapter_name=adapter_name,
                targets=dict(targets),
                context=context,
            )
            context.shared = shared
            if shared is not None:
                clash = [k for k in shared.state_dict() if k.split(".")[0] == "model"]
                if clash:
                    raise PluginError(f"{method.name}: a shared state may not name tensors model.*, got {clash}")
                _place(shared, next(iter(targets.values())), autocast_adapter_dtype)
            for path, base in targets.items():
                adapter = create(
                    "grafting_create_layer_adapter",
                    config=config,
                    base_layer=base,
                    adapter_name=adapter_name,
                    module_name=path,
                    model=self.model,
                    shared=shared,
                    context=context,
                )
                if adapter is None:
                    raise UnsupportedLayerError(
                        f"{config.peft_type} adapter {adapter_name!r}: {path} is a {type(base).__name__}, which no "
                        f"installed plugin can adapt with {config.peft_type}"
                    )
                _place(adapter, base, autocast_adapter_dtype)
                created.append((path, adapter))
        else:
            model_adapter = create(
                "grafting_create_model_adapter",
                config=config,
                model=self.model,
                adapter_name=adapter_name,
                context=AdapterContext(config, self.model, adapter_name),
            )
            if model_adapter is None:
                raise PluginError(f"the {method.name} plugin built no model adapter for {type(self.model).__name__}")
            _place(model_adapter, self.model, autocast_adapter_dtype)
        beyond = [path for path, adapter in created if not adapter.peft_loadable]
        if beyond:
            warnings.warn(
                f"{config.peft_type} adapter {adapter_name!r} on {beyond[:5]}{' …' if len(beyond) > 5 else ''}: PEFT's"
                f" {config.peft_type} refuses these layer types; grafting adapts, saves and loads them, PEFT cannot"
                " load the saved folder",
                BeyondPeftWarning,
                stacklevel=3,
            )
        saved = self._modules_to_save_paths(config)
        tied_copies: dict[str, str] = {}  # partner path -> the embedding path whose copy it shares
        if tying is not None and tying.option == "modules_to_save" and tying.embedding in saved:
            tied_copies = {p: tying.embedding for p in tying.partners}
            saved = [p for p in saved if p not in tied_copies] + list(tied_copies)
        # every check passed: install
        for path, adapter in created:
            where = physical_path(self.model, path)  # after this loop's earlier installs
            module = self.model.get_submodule(where)
            if not isinstance(module, AdaptedLayer):
                module = AdaptedLayer(module)
                self.model.set_submodule(where, module)
            module.add_adapter(adapter_name, adapter)
            adapter.attach(module.base_layer)
        if model_adapter is not None:
            self.model_adapters[adapter_name] = model_adapter
        if shared is not None:
            self.shared_states[adapter_name] = shared
        for path in saved:
            where = physical_path(self.model, path)
            wrapper = self.model.get_submodule(where)
            if not isinstance(wrapper, ModulesToSaveWrapper):
                wrapper = ModulesToSaveWrapper(wrapper)
                self.model.set_submodule(where, wrapper)
            tied_to = (
                self.model.get_submodule(physical_path(self.model, tied_copies[path])) if path in tied_copies else None
            )
            wrapper.add_copy(adapter_name, tied_to=tied_to if isinstance(tied_to, ModulesToSaveWrapper) else None)
        if method.level == "layer" and config.target_modules is None and defaults is not None:
            # saved as the resolved names, as PEFT writes them: serving stacks (vLLM, SGLang) read this list
            config = attrs.evolve(config, target_modules=defaults)
        self.peft_config[adapter_name] = config
        if not self.active_adapters:
            self.set_adapter(adapter_name, inference_mode=config.inference_mode)
        else:  # a new inactive adapter starts frozen, as in PEFT
            self._refresh_trainable()

    def _with_task_heads(self, config: AdapterConfig) -> AdapterConfig:
        heads = TASK_HEADS.get(config.task_type or "")
        if not heads:
            return config
        current = list(config.modules_to_save or [])
        return attrs.evolve(config, modules_to_save=current + [h for h in heads if h not in current])

    def _modules_to_save_paths(self, config: AdapterConfig) -> list[str]:
        if not config.modules_to_save:
            return []
        paths = [
            n
            for n, m in candidate_modules(self.model)
            if name_matches(n, config.modules_to_save) and not isinstance(m, AdaptedLayer)
        ]
        # the outermost match only (a head, not its submodules)
        paths = [p for p in paths if not any(p.startswith(q + ".") for q in paths)]
        if not paths:
            raise TargetNotFoundError(
                f"{type(config).__name__}: modules_to_save={config.modules_to_save!r} matches no module of the model"
            )
        return paths

    @property
    def prefix(self) -> str:
        """PEFT's tuner ``prefix`` (``model.prefix``): how the adapter parameters' names of this model's method start.

        Declared by the method's plugin (``Method.prefix``); the active adapter's method first.
        """
        names = [*self.active_adapters, *self.peft_config]
        for name in names:
            prefix = get_method(self.peft_config[name].peft_type).prefix if name in self.peft_config else None
            if prefix is not None:
                return prefix
        raise AttributeError(f"no adapter of this model has a parameter prefix: {sorted(self.peft_config)}")

    # -- activation -------------------------------------------------------------------
    @property
    def active_adapter(self) -> list[str]:
        """The active adapters' names (a list, as PEFT's tuner gives it; ``PeftModel.active_adapter`` is the name)."""
        return list(self.active_adapters)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make ``adapter_name`` (one name or a list) the active adapters.

        As in PEFT, the activated adapters become trainable and every other
        adapter is frozen; ``inference_mode=True`` freezes the activated ones too.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            self._require(name)
        types = {self.peft_config[n].peft_type for n in names}
        if len(types) > 1 and not self.mixed:
            raise AdapterStateError(f"adapters {names} are of different methods {sorted(types)}; use a mixed model")
        if len([n for n in names if n in self.model_adapters]) > 1:
            raise AdapterStateError(f"only one model-level adapter can be active at a time, got {names}")
        for path, wrapper in self.save_wrappers():
            sharing = [n for n in names if n in wrapper.modules_to_save]
            if len(sharing) > 1:  # one copy of the module runs; PEFT refuses with a ValueError
                raise ActiveAdaptersError(
                    f"Only one adapter can be set at a time for ModulesToSaveWrapper, got {len(sharing)}: adapters"
                    f" {sharing} each train their own copy of {path} (modules_to_save); activate one of them"
                )
        self._rebuild_all({path: set() for path, layer in self.adapted_layers() if _unmerge_for(layer, names)})
        for _, layer in self.adapted_layers():
            layer.set_active(names)
        for _, wrapper in self.save_wrappers():
            wrapper.set_active(names)
        self.active_adapters = names
        self.trainable_adapters = set() if inference_mode else set(names)
        self._refresh_trainable()

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Let the given adapters' parameters train (``requires_grad=True``) or freeze them, active or not."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self._require(name)
        if requires_grad:
            self.trainable_adapters |= set(names)
        else:
            self.trainable_adapters -= set(names)
        self._refresh_trainable()

    def _refresh_trainable(self) -> None:
        """The adapters in ``trainable_adapters`` train; everything else is frozen."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        for name, config in self.peft_config.items():
            train = name in self.trainable_adapters
            for _, layer in self.adapted_layers():
                if name in layer.adapters:
                    layer.adapters[name].requires_grad_(train)
            for _, wrapper in self.save_wrappers():
                if name in wrapper.modules_to_save:
                    wrapper.modules_to_save[name].requires_grad_(train)
            if name in self.model_adapters:
                self.model_adapters[name].requires_grad_(train)
            if name in self.shared_states:
                self.shared_states[name].requires_grad_(train)
            if train:
                for pname in config.trainable_base_parameters(self.model, [p for p, _ in self.adapted_layers()]):
                    self.model.get_parameter(pname).requires_grad_(True)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes as its base (merged adapters are unmerged meanwhile)."""
        merged = {path: set(layer.merged) for path, layer in self.adapted_layers() if layer.merged}
        self._rebuild_all({path: set() for path in merged})
        modules = [m for _, m in self.adapted_layers()] + [w for _, w in self.save_wrappers()]
        previous = self.disabled
        for m in modules:
            m.disabled = True
        self.disabled = True
        try:
            yield
        finally:
            for m in modules:
                m.disabled = False
            self.disabled = previous
            self._rebuild_all(merged)

    def disable_adapter_layers(self) -> None:
        """Compute as the base model until :meth:`enable_adapter_layers` (merged adapters are unmerged)."""
        self.unmerge_adapter()
        self._set_disabled(True)

    def enable_adapter_layers(self) -> None:
        self._set_disabled(False)

    def _set_disabled(self, disabled: bool) -> None:
        modules: list[AdaptedLayer | ModulesToSaveWrapper] = [m for _, m in self.adapted_layers()]
        modules += [w for _, w in self.save_wrappers()]
        for m in modules:
            m.disabled = disabled
        self.disabled = disabled

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether adapter ``adapter_name`` is ``W + ΔW`` on every layer it touches (its adapters say so)."""
        self._require(adapter_name)
        if adapter_name in self.model_adapters:
            return False
        found = [layer.adapters[adapter_name] for _, layer in self.adapted_layers() if adapter_name in layer.adapters]
        return bool(found) and all(getattr(a, "lora_convertible", False) for a in found)

    # -- model-level adapters in forward ----------------------------------------------
    def active_model_adapter(self) -> ModelAdapter | None:
        if self.disabled:
            return None
        for name in self.active_adapters:
            if name in self.model_adapters:
                return self.model_adapters[name]  # type: ignore[return-value]
        return None

    # -- merging ------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base weights, all layers or none."""
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        for name in names:
            self._require(name)
            if name in self.model_adapters:
                raise MergeError(
                    f"adapter {name!r} ({self.peft_config[name].peft_type}) acts on the model's inputs and cannot be merged"
                )
        already = sorted({n for _, layer in self.adapted_layers() for n in layer.merged})
        if already:  # as PEFT warns (a UserWarning)
            more = [n for n in names if n not in already]
            warnings.warn(
                f"adapters {already} are already merged; now also merging {more}"
                if more
                else f"All adapters are already merged, nothing to do. (merged: {already})",
                GraftingWarning,
                stacklevel=3,
            )
        for path, layer in self.adapted_layers():  # refuse before any layer's weights change
            layer.check_merge(names, safe=safe_merge, layer_name=path)
        done: list[tuple[str, AdaptedLayer, list[str]]] = []
        try:
            for path, layer in self.adapted_layers():
                before = list(layer.merged)
                layer.merge(names, safe=safe_merge, layer_name=path)
                done.append((path, layer, before))
        except BaseException:
            for path, layer, before in reversed(done):
                layer._rebuild(set(before), safe=False, layer_name=path)
            raise

    def unmerge_adapter(self) -> None:
        """Take every merged adapter out of the base weights, all layers or none."""
        self._rebuild_all({path: set() for path, layer in self.adapted_layers() if layer.merged})

    def _rebuild_all(self, targets: dict[str, set[str]], *, without: str | None = None) -> None:
        """Bring each layer at ``path`` to the merged set ``targets[path]``, every layer or none.

        Every change is checked first (:meth:`AdaptedLayer.check_rebuild`, on a copy of the layer where
        weights would come out), so a refusal leaves all weights as they were. Should a layer still fail,
        the layers already changed are brought back.
        """
        layers = dict(self.adapted_layers())
        changes = [
            (path, layers[path], target) for path, target in targets.items() if target != set(layers[path].merged)
        ]
        for path, layer, target in changes:
            layer.check_rebuild(target, layer_name=path, without=without)
        done: list[tuple[str, AdaptedLayer, list[str], tuple[str, ...]]] = []
        try:
            for path, layer, target in changes:
                before, active = list(layer.merged), layer.active
                if without is not None:
                    layer.active = tuple(n for n in layer.active if n != without)
                done.append((path, layer, before, active))
                layer._rebuild(target, safe=False, layer_name=path)
        except BaseException:
            for path, layer, before, active in reversed(done):
                layer._rebuild(set(before), safe=False, layer_name=path)
                layer.active = active
            raise

    def _unload(
        self, *, merge: bool, safe_merge: bool, adapter_names: list[str] | None, progressbar: bool
    ) -> nn.Module:
        if merge:
            self.merge_adapter(adapter_names, safe_merge=safe_merge)
        layers = list(self.adapted_layers())[::-1]  # inner layers first: their paths pass through outer ones
        if progressbar:
            from tqdm.auto import tqdm

            layers = list(tqdm(layers, desc="Unloading" + (" and merging" if merge else "")))
        for path, layer in layers:
            self.model.set_submodule(path, layer.base_layer)
        for path, wrapper in list(self.save_wrappers())[::-1]:
            keep = wrapper.modules_to_save[wrapper.active] if merge and wrapper.active else wrapper.original_module
            self.model.set_submodule(path, keep)
        return self.model

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge adapters into the base weights and return the plain model."""
        return self._unload(merge=True, safe_merge=safe_merge, adapter_names=adapter_names, progressbar=progressbar)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the original model."""
        self.unmerge_adapter()
        return self._unload(merge=False, safe_merge=False, adapter_names=None, progressbar=False)

    # -- combining ------------------------------------------------------------------------
    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> None:
        """Add ``adapter_name``, made from ``adapters`` weighted by ``weights`` (inactive until set).

        The method's plugin derives the new config and fills its tensors
        (the ``grafting_combine_adapters`` hook). LoRA's ``combination_type``:
        ``svd`` (default), ``linear``, ``cat``, ``ties``, ``ties_svd``,
        ``dare_linear``, ``dare_ties``, ``dare_linear_svd``, ``dare_ties_svd``,
        ``magnitude_prune``, ``magnitude_prune_svd``; ``density`` is the kept
        fraction for the pruning ones, ``majority_sign_method`` (``"total"`` or
        ``"frequency"``) the sign election of the TIES ones, ``svd_rank`` /
        ``svd_clamp`` / ``svd_full_matrices`` / ``svd_driver`` shape the SVD.
        IA3 combines its vectors linearly. An existing ``adapter_name`` is
        left alone with a warning (PEFT returns silently).
        """
        from grafting.model.combine import add_weighted_adapter

        add_weighted_adapter(
            self,
            adapters,
            weights,
            adapter_name,
            combination_type=combination_type,
            svd_rank=svd_rank,
            svd_clamp=svd_clamp,
            svd_full_matrices=svd_full_matrices,
            svd_driver=svd_driver,
            density=density,
            majority_sign_method=majority_sign_method,
        )

    # -- deleting -------------------------------------------------------------------------
    def delete_adapter(self, adapter_name: str | list[str]) -> None:
        """Remove one adapter or a list of them, each taken out of the weights first where merged.

        Every name is checked before anything is removed; a refusal leaves the
        adapter it concerns in place. When an active adapter goes, the remaining
        active ones (else the first remaining adapter) become active and trainable, as in PEFT.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            self._require(name)
        for name in dict.fromkeys(names):
            self._delete_one(name)

    def _delete_one(self, adapter_name: str) -> None:
        self._rebuild_all(
            {
                path: set(layer.merged) - {adapter_name}
                for path, layer in self.adapted_layers()
                if adapter_name in layer.merged
            },
            without=adapter_name,
        )
        for path, layer in list(self.adapted_layers())[::-1]:  # inner layers first
            if adapter_name in layer.adapters:
                layer.remove_adapter(adapter_name)
                if not len(layer.adapters):
                    self.model.set_submodule(path, layer.base_layer)
        for path, wrapper in list(self.save_wrappers())[::-1]:
            if adapter_name in wrapper.modules_to_save:
                del wrapper.modules_to_save[adapter_name]
                if not len(wrapper.modules_to_save):
                    self.model.set_submodule(path, wrapper.original_module)
        if adapter_name in self.model_adapters:
            del self.model_adapters[adapter_name]
        if adapter_name in self.shared_states:
            del self.shared_states[adapter_name]
        del self.peft_config[adapter_name]
        self.trainable_adapters.discard(adapter_name)
        remaining = [n for n in self.active_adapters if n != adapter_name]
        if remaining == self.active_adapters:  # an inactive adapter went: nothing else changes
            self._refresh_trainable()
            return
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self.active_adapters = []
        if remaining:
            self.set_adapter(remaining)
