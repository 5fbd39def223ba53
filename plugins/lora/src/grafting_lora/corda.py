"""CorDA: context-oriented decomposition (``init_lora_weights="corda"``).

A data step before the adapter, as in PEFT: :func:`preprocess_corda` runs the model on sample
data (``run_model``), accumulates for each targeted linear layer the covariance ``C`` of its
inputs, and decomposes ``W·C = U·S·Vᵀ`` (``C`` damped until it inverts cleanly). The layer keeps
``U``, ``S`` and ``V = C⁻¹·V`` of its top (``"ipm"``) or bottom (``"kpm"``) ``r`` components as
``module.eigens`` (PEFT's attribute). Creating the adapter then starts it on ``U·S·Vᵀ`` (split as
PiSSA splits it) and leaves the residual in the base, consuming ``eigens``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn
from tqdm import tqdm

from grafting import ConfigError
from grafting.toolkit import candidate_modules, dense_weight, find_targets, is_linear, query_value_projections


@attrs.define
class CordaEigens:
    """One layer's decomposition, cropped to its rank: ``U_WC`` (out, r), ``S_WC`` (r), ``V_WC`` (in, r)."""

    S_WC: torch.Tensor  # PEFT's attribute names
    U_WC: torch.Tensor
    V_WC: torch.Tensor


def _targets(model: nn.Module, config: Any) -> dict[str, nn.Module]:
    """The linear layers ``config`` adapts on the plain ``model``, by name."""
    modules = dict(candidate_modules(model))
    names = find_targets(model, config, query_value_projections(model))
    return {name: modules[name] for name in names if is_linear(modules[name])}


def _load(path: str | None) -> dict[str, torch.Tensor] | None:
    if path is not None and os.path.isfile(path) and os.path.getsize(path) > 0:
        return torch.load(path, map_location="cpu", weights_only=True)
    return None


def _save(path: str, tensors: dict[str, torch.Tensor]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, path)


@torch.no_grad()
def covariances(
    targets: dict[str, nn.Module],
    run_model: Callable[[], None],
    hooked: dict[str, nn.Module],
    float16: bool = False,
) -> dict[str, torch.Tensor]:
    """Mean over forward calls of ``XᵀX`` (X a call's inputs to the layer, divided by their maximum)."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(targets, 0)

    def observer(name: str) -> Callable[..., None]:
        def observe(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]) if float16 else x.reshape(-1, x.shape[-1]).float()
            x = x / x.max().abs()
            if not torch.isfinite(x).all():
                raise ConfigError(f"preprocess_corda: {name} received inputs that are not finite (or all zero)")
            product = x.T @ x
            sums[name] = product if name not in sums else sums[name] + product
            counts[name] += 1

        return observe

    handles = [hooked[name].register_forward_hook(observer(name)) for name in targets if name in hooked]
    try:
        run_model()
    finally:
        for handle in handles:
            handle.remove()
    silent = [name for name, count in counts.items() if count == 0]
    if silent:
        raise ConfigError(f"preprocess_corda: run_model never called {silent}; the covariance needs their inputs")
    return {name: sums[name] / counts[name] for name in targets}


@torch.no_grad()
def decompose(weight: torch.Tensor, covariance: torch.Tensor, where: str) -> CordaEigens:
    """The SVD of ``W·C`` (``C`` damped by a multiple of its mean diagonal until ``C·C⁻¹ ≈ I``), ``V`` = ``C⁻¹·V``."""
    w = weight.float()
    c = covariance.float()
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    damp = 0.01
    for _ in range(64):
        damped = c + eye * (c.diagonal().mean() * damp)
        inverse = torch.linalg.inv(damped)
        if torch.dist(damped @ inverse, eye).item() < 0.05:
            break
        damp *= 2
    else:
        raise ConfigError(f"preprocess_corda: the input covariance of {where} cannot be inverted")
    u, s, vh = torch.linalg.svd(w @ damped, full_matrices=False)
    return CordaEigens(S_WC=s, U_WC=u, V_WC=(vh @ inverse).T)


def _crop(eigens: CordaEigens, r: int, method: str) -> CordaEigens:
    part = slice(None, r) if method == "ipm" else slice(-r, None)
    return CordaEigens(
        S_WC=eigens.S_WC[part].clone(),
        U_WC=eigens.U_WC[:, part].clone(),
        V_WC=eigens.V_WC[:, part].clone(),
    )


@torch.no_grad()
def preprocess_corda(
    model: nn.Module,
    lora_config: Any,
    run_model: Callable[[], None] | None = None,
    hooked_model: nn.Module | None = None,
) -> None:
    """Give every linear layer ``lora_config`` targets its CorDA decomposition (``module.eigens``).

    ``run_model()`` runs ``model`` (or ``hooked_model``, a copy with the same module names) on
    sample data; it is not needed when ``corda_config.cache_file`` (the cropped decompositions) or
    ``covariance_file`` already exists. Both files are written when named and missing.
    """
    options = lora_config.corda_config
    if options is None:
        raise ConfigError("preprocess_corda: LoraConfig.corda_config is not set (init_lora_weights='corda')")
    targets = _targets(model, lora_config)
    cache = _load(options.cache_file)
    if cache is not None:
        for name, module in targets.items():
            missing = [f"{name}.eigens.{k}" for k in ("S_WC", "U_WC", "V_WC") if f"{name}.eigens.{k}" not in cache]
            if missing:
                raise ConfigError(f"preprocess_corda: cache_file {options.cache_file} has no {missing}")
            device = dense_weight(module).device
            module.eigens = CordaEigens(**{k: cache[f"{name}.eigens.{k}"].to(device) for k in ("S_WC", "U_WC", "V_WC")})
        return
    stats = _load(options.covariance_file)
    if stats is None:
        if run_model is None:
            raise ConfigError("preprocess_corda: run_model is needed unless cache_file or covariance_file exists")
        hooked = targets if hooked_model is None else dict(candidate_modules(hooked_model))
        was_training = (hooked_model or model).training
        (hooked_model or model).eval()
        try:
            stats = covariances(targets, run_model, hooked, options.use_float16_for_covariance)
        finally:
            (hooked_model or model).train(was_training)
        if options.covariance_file is not None:
            _save(options.covariance_file, stats)
    found: dict[str, CordaEigens] = {}
    for name, module in tqdm(targets.items(), desc="CorDA", disable=not options.verbose):
        if name not in stats:
            raise ConfigError(f"preprocess_corda: covariance_file {options.covariance_file} has no {name}")
        weight = dense_weight(module)
        full = decompose(weight, stats[name].to(weight.device), name)
        found[name] = _crop(full, lora_config.rank_for(name), options.corda_method)
    for name, eigens in found.items():
        targets[name].eigens = eigens
    if options.cache_file is not None:
        _save(
            options.cache_file,
            {f"{n}.eigens.{k}": getattr(e, k) for n, e in found.items() for k in ("S_WC", "U_WC", "V_WC")},
        )


def _forget_eigens(base_layer: nn.Module) -> None:
    """The decomposition describes the weight before the residual was written: used once (as PEFT)."""
    if hasattr(base_layer, "eigens"):
        del base_layer.eigens


def initialize_corda(adapter: nn.Module, base_layer: nn.Module, module_name: str, r: int, scaling: float) -> None:
    """CorDA factors for a linear adapter from ``base_layer.eigens``; ``attach`` leaves the residual."""
    from grafting_lora.init import start_from

    eigens = getattr(base_layer, "eigens", None)
    if not isinstance(eigens, CordaEigens) and not all(hasattr(eigens, k) for k in ("S_WC", "U_WC", "V_WC")):
        raise ConfigError(
            f"{module_name}: init_lora_weights='corda' needs preprocess_corda(model, lora_config, run_model=...)"
            " before the adapter is created"
        )
    stored = getattr(base_layer, "weight", None)
    if not isinstance(stored, torch.Tensor) or not stored.is_floating_point():
        raise ConfigError(
            f"{module_name}: init_lora_weights='corda' needs a float weight (quantize the residual model afterwards)"
        )
    n_out, n_in = dense_weight(base_layer).shape
    u, s, v = eigens.U_WC, eigens.S_WC, eigens.V_WC
    if tuple(u.shape) != (n_out, r) or tuple(s.shape) != (r,) or tuple(v.shape) != (n_in, r):
        raise ConfigError(
            f"{module_name}: the CorDA decomposition has shapes U {tuple(u.shape)}, S {tuple(s.shape)},"
            f" V {tuple(v.shape)}, not ({n_out}, {r}), ({r},), ({n_in}, {r}): preprocess_corda ran with another"
            " config or model"
        )
    if not all(torch.isfinite(t).all() for t in (u, s, v)):
        raise ConfigError(f"{module_name}: the CorDA decomposition holds values that are not finite")
    root = (s.float() / scaling).sqrt()
    a = v.float().T * root[:, None]
    b = u.float() * root[None, :]
    start_from(adapter, base_layer, a.contiguous(), b.contiguous(), residual=True, then=_forget_eigens)
