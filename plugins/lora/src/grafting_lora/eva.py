"""EVA: explained variance adaptation (``init_lora_weights="eva"``), a data step after creation.

An EVA adapter is created like plain LoRA (B zero). :func:`initialize_lora_eva_weights` then runs
the model (adapters disabled) over a dataloader and fits, per targeted linear layer, an incremental
PCA of the layer's inputs until the leading components stop moving (cosine similarity ``tau``
between successive batches). The rank budget (the sum of the layers' ranks) goes to the
components that explain the most variance, at most ``round(r·rho)`` per layer; each layer's ``A``
becomes its top components. Layers that see the same input (q/k/v projections) share one PCA.
The adapter is then rebuilt through the ordinary ``delete_adapter``/``add_adapter`` path with the
new ``rank_pattern``/``alpha_pattern``/``target_modules`` (a layer given rank 0 is left out), so
the saved config is PEFT's and PEFT loads the adapter.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from grafting import AdaptedLayer, ConfigError, GraftingWarning
from grafting.toolkit import candidate_modules, find_targets, is_linear, query_value_projections

#: The name prefix of the user's model inside a PeftModel (PEFT's state-dict keys start with it).
PEFT_PREFIX = "base_model.model."


# -- incremental PCA -------------------------------------------------------------------------------------
class IncrementalPCA:
    """Principal components of a stream of (n, d) batches (the Ross et al. update, sklearn's algorithm).

    Each update decomposes the new batch, centred, stacked under the previous components (scaled
    by their singular values) and a row correcting for the shift of the mean, with a seeded
    randomized SVD of ``2·k`` columns (as PEFT's EVA does, so both give the same components).
    """

    def __init__(self, n_components: int, seed: int = 42, niter: int = 4) -> None:
        self.k, self.seed, self.niter = n_components, seed, niter
        self.seen = 0
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None
        self.components: torch.Tensor | None = None
        self.singular_values: torch.Tensor | None = None
        self.explained_variance_ratio: torch.Tensor | None = None

    def _moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The running mean and variance over every row seen so far, ``x`` included (Chan et al.)."""
        n, total = x.shape[0], self.seen + x.shape[0]
        batch_sum = x.sum(0)
        batch_mean = batch_sum / n
        batch_sq = ((x - batch_mean) ** 2).sum(0) - ((x - batch_mean).sum(0)) ** 2 / n
        if self.seen == 0 or self.mean is None or self.var is None:
            return batch_mean, batch_sq / total
        old_sum = self.mean * self.seen
        ratio = self.seen / n
        sq = self.var * self.seen + batch_sq + ratio / total * (old_sum / ratio - batch_sum) ** 2
        return (old_sum + batch_sum) / total, sq / total

    def _svd(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            _, s, v = torch.svd_lowrank(x, q=2 * self.k, niter=self.niter)
        vt = v.mH
        signs = torch.sign(vt[torch.arange(vt.shape[0]), vt.abs().argmax(dim=1)])  # a fixed sign per component
        return s, vt * signs[:, None]

    def partial_fit(self, x: torch.Tensor) -> None:
        x = x.to(torch.float32) if x.dtype not in (torch.float32, torch.float64) else x.clone()
        if not self.k <= min(x.shape):
            raise ConfigError(
                f"EVA: {self.k} components need batches of at least {self.k} rows and {self.k} features,"
                f" got {tuple(x.shape)}"
            )
        mean, var = self._moments(x)
        total = self.seen + x.shape[0]
        if self.components is None or self.singular_values is None or self.mean is None:
            stacked = x - mean
        else:
            batch_mean = x.mean(0)
            # a 1-element float64 tensor (not a 0-d one, which would not widen the product)
            factor = torch.tensor([math.sqrt(self.seen / total * x.shape[0])], dtype=torch.float64, device=x.device)
            shift = factor * (self.mean - batch_mean)  # float64, as sklearn's: the stack is decomposed in float64
            stacked = torch.vstack((self.singular_values[:, None] * self.components, x - batch_mean, shift[None]))
        s, vt = self._svd(stacked)
        self.seen, self.mean, self.var = total, mean, var
        self.components, self.singular_values = vt[: self.k], s[: self.k]
        self.explained_variance_ratio = (s**2 / (var * total).sum())[: self.k]


# -- the default input preparation (language modelling) ---------------------------------------------------------
def forward_fn_dict(model: nn.Module, inputs: Mapping[str, Any]) -> Any:
    """Call the model with a batch dict as keyword arguments."""
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input: Any, peft_config: Any) -> torch.Tensor:
    """The (batch, position) indices EVA fits on: attended positions, minus masked labels if asked."""
    if not isinstance(model_input, Mapping):
        raise ConfigError("EVA: the default prepare_model_inputs_fn needs dict batches (input_ids, attention_mask...)")
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    options = peft_config.eva_config
    if options.use_label_mask and "labels" in model_input:
        mask = mask & (model_input["labels"] != options.label_mask_value)
    return mask.nonzero()


def prepare_layer_inputs_fn_language_modeling(layer_input: Any, model_input: Any, layer_name: str) -> torch.Tensor:
    """The layer's input rows at the indices :func:`prepare_model_inputs_fn_language_modeling` chose."""
    return _first_tensor(layer_input, layer_name)[model_input.T.unbind()]


def _first_tensor(layer_input: Any, layer_name: str) -> torch.Tensor:
    if isinstance(layer_input, (tuple, list)) and layer_input:
        layer_input = layer_input[0]
    if not isinstance(layer_input, torch.Tensor):
        raise ConfigError(f"EVA: {layer_name} got a {type(layer_input).__name__}; pass a prepare_layer_inputs_fn")
    return layer_input


def _rows(layer_input: Any, model_input: Any, layer_name: str) -> torch.Tensor:
    """Without a preparation function: the layer input as (rows, features)."""
    x = _first_tensor(layer_input, layer_name)
    return x.reshape(-1, x.shape[-1]) if x.ndim > 2 else x


def _gathered(x: torch.Tensor, gather: bool) -> torch.Tensor:
    """Under torch.distributed, the rows of every rank (padded to one size for the collective)."""
    if not (gather and dist.is_available() and dist.is_initialized()):
        return x
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


@attrs.define
class _Layer:
    """One hooked layer: how its inputs become PCA rows, and the PCA once it is fitted."""

    name: str
    module: nn.Module
    prepare: Callable[..., torch.Tensor]
    model_input: Any = None
    pca: IncrementalPCA | None = None
    first: torch.Tensor | None = None
    converged: torch.Tensor | None = None
    handle: Any = None

    def rows(self, args: tuple[Any, ...], gather: bool) -> torch.Tensor:
        with torch.no_grad():
            return _gathered(self.prepare(args, self.model_input, self.name), gather)

    def observe(self, gather: bool, tau: float) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = self.rows(args, gather)
            if self.pca is None:  # the first batch: kept to find layers that share their input
                self.first = x.detach().clone()
                return
            if x.shape[0] < self.pca.k:
                return  # too few rows in this batch for the components asked
            before = None if self.pca.components is None else self.pca.components.clone()
            self.pca.partial_fit(x.float())
            if before is not None and self.pca.components is not None:
                similarity = torch.nn.functional.cosine_similarity(self.pca.components, before)
                self.converged = (similarity >= tau).cpu()

        return hook


def _eva_targets(model: nn.Module, peft_config: Any, adapter_name: str, in_peft: bool) -> dict[str, nn.Module]:
    """The layers EVA fits, by their names in ``model``: LoRA-adapted linear layers, or the config's targets."""
    if in_peft:
        from grafting_lora.layers import LoraLinear

        return {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, AdaptedLayer)
            and adapter_name in module.adapters
            and isinstance(module.adapters[adapter_name], LoraLinear)
        }
    modules = dict(candidate_modules(model))
    names = find_targets(model, peft_config, query_value_projections(model))
    return {name: modules[name] for name in names if is_linear(modules[name])}


def _rank_distribution(
    layers: dict[str, _Layer], owner: dict[str, str], shared: dict[str, str], budget: int, cap: dict[str, int]
) -> dict[str, int]:
    """The ``budget`` components of largest explained variance, counted per layer (capped per layer)."""
    keys, values = [], []
    for name, hook_name in owner.items():
        ratio = layers[hook_name].pca.explained_variance_ratio  # type: ignore[union-attr]
        for value in ratio[: cap[name]]:  # type: ignore[index]
            keys.append(name)
            values.append(value)
    order = torch.stack(values).argsort(descending=True)
    counted = Counter(keys[i] for i in order[:budget].tolist())
    ranks = {name: counted.get(name, 0) for name in owner}
    for name, hook_name in shared.items():  # the PCA's owner takes the largest rank its group uses
        if ranks[hook_name] < ranks[name]:
            ranks[hook_name], ranks[name] = ranks[name], ranks[hook_name]
    return ranks


def _move(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if hasattr(batch, "to"):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: _move(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_move(v, device) for v in batch)
    return batch


@torch.no_grad()
def _fit(
    model: nn.Module,
    dataloader: Iterable[Any],
    peft_config: Any,
    targets: dict[str, nn.Module],
    forward_fn: Callable[[nn.Module, Any], Any],
    prepare_model_inputs_fn: Callable[..., Any] | None,
    prepare_layer_inputs_fn: Callable[..., torch.Tensor] | Mapping[str, Callable[..., torch.Tensor]] | None,
    gather: bool,
    show_progress_bar: bool,
) -> dict[str, torch.Tensor]:
    options = peft_config.eva_config
    if hasattr(dataloader, "__len__") and len(dataloader) == 0:  # type: ignore[arg-type]
        raise ConfigError("EVA: the dataloader is empty")
    if not targets:
        raise ConfigError("EVA: no linear layer to initialize (EVA fits nn.Linear/Conv1D inputs)")
    rho = options.rho
    if rho > 1000:  # "unbounded": as many components as the largest dimension allows
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // peft_config.r)
    per_layer = dict(prepare_layer_inputs_fn) if isinstance(prepare_layer_inputs_fn, Mapping) else None
    unknown = sorted(set(per_layer or ()) - set(targets))
    if unknown:
        raise ConfigError(f"EVA: prepare_layer_inputs_fn names layers that are not targets: {unknown}")

    def preparation(name: str) -> Callable[..., torch.Tensor]:
        chosen = per_layer.get(name) if per_layer is not None else prepare_layer_inputs_fn
        return chosen if callable(chosen) else _rows  # type: ignore[return-value]

    layers = {name: _Layer(name, module, preparation(name)) for name, module in targets.items()}
    ranks = {name: peft_config.rank_for(_logical(name)) for name in layers}
    cap = {name: round(ranks[name] * rho) for name in layers}
    budget = sum(ranks.values())
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), None)

    def model_input(batch: Any) -> Any:
        return prepare_model_inputs_fn(batch, peft_config) if prepare_model_inputs_fn is not None else batch

    was_training = model.training
    model.eval()
    try:
        # one batch to find layers that see the same input (they share one PCA)
        batch = _move(next(iter(dataloader)), device)
        prepared = model_input(batch)
        for layer in layers.values():
            layer.model_input = prepared
            layer.handle = layer.module.register_forward_hook(layer.observe(gather, options.tau))
        forward_fn(model, batch)
        for layer in layers.values():
            layer.handle.remove()
            layer.handle = None
        shared: dict[str, str] = {}
        owners: list[str] = []
        for name, layer in layers.items():
            same = next((o for o in owners if _same_rows(layers[o].first, layer.first)), None)
            if same is None:
                owners.append(name)
            else:
                shared[name] = same
                cap[same] = cap[name] = max(cap[same], cap[name])
        for name in owners:
            layers[name].pca = IncrementalPCA(cap[name])
            layers[name].converged = torch.zeros(cap[name], dtype=torch.bool)
        owner = {**{n: n for n in owners}, **shared}
        done = dict.fromkeys(owners, False)
        assigned = dict(cap)
        progress = tqdm(disable=not show_progress_bar, leave=False, desc="EVA")
        steps, passes = 0, len(dataloader) if hasattr(dataloader, "__len__") else math.inf  # type: ignore[arg-type]
        for batch in itertools.cycle(dataloader):
            batch = _move(batch, device)
            prepared = model_input(batch)
            for name in owners:
                layer = layers[name]
                now = bool(layer.converged[: assigned[name]].all())  # type: ignore[index]
                if now and not done[name]:
                    if layer.handle is not None:
                        layer.handle.remove()
                        layer.handle = None
                    done[name] = True
                    continue
                if done[name] and not now:
                    done[name] = False
                if not done[name] and layer.handle is None:
                    layer.handle = layer.module.register_forward_hook(layer.observe(gather, options.tau))
                layer.model_input = prepared
            progress.set_postfix_str(f"{sum(done.values())}/{len(done)} converged")
            if all(done.values()):
                break
            forward_fn(model, batch)
            progress.update()
            steps += 1
            unfitted = [n for n in owners if layers[n].pca.components is None]  # type: ignore[union-attr]
            if not unfitted:
                assigned = _rank_distribution(layers, owner, shared, budget, cap)
            elif steps >= passes:  # a whole pass without enough rows: the next passes replay the same batches
                raise ConfigError(
                    f"EVA: no batch gave {_logical(unfitted[0])} the {cap[unfitted[0]]} rows its components need"
                    " (after masking); use larger batches or fewer masked positions"
                )
        progress.close()
    finally:
        for layer in layers.values():
            if layer.handle is not None:
                layer.handle.remove()
        model.train(was_training)
    result: dict[str, torch.Tensor] = {}
    for name in layers:
        pca = layers[owner[name]].pca
        if pca is None or pca.components is None or pca.singular_values is None:  # pragma: no cover - converged
            raise ConfigError(f"EVA: {name} was never fitted")
        rank = assigned[name]
        components = pca.components[:rank]
        if options.whiten:
            components = components / pca.singular_values[:rank].sqrt()[:, None]
        result[name] = components.to(device) if device is not None else components
    return result


def _same_rows(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is not None and b is not None and a.shape == b.shape and torch.equal(a, b)


def _logical(name: str) -> str:
    name = name.removeprefix(PEFT_PREFIX)
    return ".".join(part for part in name.split(".") if part != "base_layer")


@torch.no_grad()
def get_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable[Any],
    peft_config: Any | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable[..., Any] | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable[..., torch.Tensor]
    | Mapping[str, Callable[..., torch.Tensor]]
    | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> dict[str, torch.Tensor]:
    """Each targeted linear layer's EVA ``A`` (its rank after redistribution × in), by module name.

    ``model`` is a PeftModel (its LoRA layers of ``adapter_name``, run with adapters disabled; names
    as in ``model.named_modules()``) or a plain model with ``peft_config`` (its matching linear
    layers). ``forward_fn(model, batch)`` runs a batch; ``prepare_model_inputs_fn(batch, config)``
    and ``prepare_layer_inputs_fn(layer_input, prepared, layer_name)`` (one function or one per
    layer name) choose the rows the PCA sees: by default the attended, label-unmasked positions.
    """
    in_peft = hasattr(model, "peft_config")
    if peft_config is None:
        if not in_peft:
            raise ConfigError("get_eva_state_dict: pass peft_config for a model that is not a PeftModel")
        peft_config = model.peft_config[adapter_name]
    if getattr(peft_config, "eva_config", None) is None:
        raise ConfigError("get_eva_state_dict: LoraConfig.eva_config is not set (init_lora_weights='eva')")
    targets = _eva_targets(model, peft_config, adapter_name, in_peft)
    context = model.disable_adapter() if in_peft else nullcontext()
    with context:
        return _fit(
            model,
            dataloader,
            peft_config,
            targets,
            forward_fn or forward_fn_dict,
            prepare_model_inputs_fn,
            prepare_layer_inputs_fn,
            gather_distributed_inputs,
            show_progress_bar,
        )


@torch.no_grad()
def initialize_lora_eva_weights(
    model: nn.Module,
    dataloader: Iterable[Any] | None = None,
    eva_state_dict: dict[str, torch.Tensor] | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable[..., Any] | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable[..., torch.Tensor]
    | Mapping[str, Callable[..., torch.Tensor]]
    | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> nn.Module:
    """Give the EVA adapter ``adapter_name`` of a PeftModel its data-driven ``A`` and redistributed ranks.

    Computes :func:`get_eva_state_dict` from ``dataloader`` unless ``eva_state_dict`` is given
    (keys with or without the ``base_model.model.`` prefix). Layers EVA does not fit (embeddings,
    convolutions) keep a plain LoRA start, with a warning. Returns ``model``.
    """
    if not hasattr(model, "peft_config") or adapter_name not in model.peft_config:
        raise ConfigError(f"initialize_lora_eva_weights: the model is not a PeftModel with adapter {adapter_name!r}")
    if len(model.active_adapters) > 1:
        raise ConfigError("initialize_lora_eva_weights works on a model with one active adapter")
    config = model.peft_config[adapter_name]
    if config.init_lora_weights != "eva":
        raise ConfigError(
            f"initialize_lora_eva_weights: adapter {adapter_name!r} has init_lora_weights="
            f"{config.init_lora_weights!r}, not 'eva'"
        )
    if eva_state_dict is None:
        if dataloader is None:
            raise ConfigError("initialize_lora_eva_weights: pass a dataloader or an eva_state_dict")
        eva_state_dict = get_eva_state_dict(
            model,
            dataloader,
            forward_fn=forward_fn,
            prepare_model_inputs_fn=prepare_model_inputs_fn,
            prepare_layer_inputs_fn=prepare_layer_inputs_fn,
            adapter_name=adapter_name,
            gather_distributed_inputs=gather_distributed_inputs,
            show_progress_bar=show_progress_bar,
        )
    _rebuild(model, {_logical(k): v for k, v in eva_state_dict.items()}, adapter_name)
    return model


def _rebuild(model: Any, components: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Re-create the adapter with EVA's ranks (through delete/add) and copy in each layer's ``A``."""
    from grafting_lora.layers import LoraLinear
    from grafting_lora.parameters import LoraParameters
    from grafting_lora.trainable_tokens import TiedTrainableTokens, TrainableTokens, TrainableTokensHead

    added_by_other_options = (LoraParameters, TiedTrainableTokens, TrainableTokens, TrainableTokensHead)
    config = model.peft_config[adapter_name]
    base = model.get_base_model()
    layers = [
        (name, module)
        for name, module in candidate_modules(base)
        if isinstance(module, AdaptedLayer) and adapter_name in module.adapters
    ]
    kept, missing, dropped = [], [], []
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for name, module in layers:
        if not isinstance(module.adapters[adapter_name], LoraLinear):
            continue  # an embedding, convolution or trainable-token layer: it is re-created as it was
        rank, alpha = config.rank_for(name), config.alpha_for(name)
        if name in components:
            new_rank = components[name].shape[0]
            if new_rank == 0:
                dropped.append(name)
                continue
            if new_rank != rank and config.eva_config.adjust_scaling_factors:
                alpha = alpha * new_rank / rank
            rank = new_rank
            kept.append(name)
        else:
            missing.append(name)
        if rank != config.r:
            rank_pattern[name] = rank
        if alpha != config.lora_alpha:
            alpha_pattern[name] = alpha
    others = [n for n, m in layers if not isinstance(m.adapters[adapter_name], (LoraLinear, *added_by_other_options))]
    if not kept and not missing and not others:
        raise ConfigError("initialize_lora_eva_weights: EVA gave every layer rank 0")
    new_config = attrs.evolve(
        config, target_modules=kept + missing + others, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern
    )
    trainable = any(p.requires_grad for n, p in model.named_parameters() if f".{adapter_name}." in n)
    active = list(model.active_adapters)
    model.delete_adapter(adapter_name)
    model.add_adapter(adapter_name, new_config)
    if active:
        model.set_adapter(active)
    if hasattr(model, "set_requires_grad"):
        model.set_requires_grad(adapter_name, requires_grad=trainable)
    adapted = dict(candidate_modules(model.get_base_model()))
    for name in kept:
        weight = adapted[name].adapters[adapter_name].lora_A.weight
        weight.copy_(components[name].to(weight))
    if missing:
        warnings.warn(
            f"EVA: {missing} had no EVA components and keep the plain LoRA start (EVA fits linear layers only)",
            GraftingWarning,
            stacklevel=3,
        )
