"""LoRA's ``add_weighted_adapter``: PEFT's combination types, on grafting's LoRA layers.

Three families, as PEFT defines them:

* ``cat``: the factors side by side, rank = the sum of the ranks; exact
  (``ΔW = Σ wᵢ ΔWᵢ``).
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``:
  ``A`` and ``B`` combined separately (each with ``√|wᵢ·sᵢ|``, the sign on
  ``A``), rank unchanged; an approximation, equal ranks required.
* ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``,
  ``magnitude_prune_svd``: the ``ΔWᵢ`` combined, then factored back to
  ``svd_rank`` (default: the largest source rank) by a truncated SVD.

The new adapter has ``lora_alpha = r`` and no rsLoRA, so its scaling is 1 and
its factors carry the whole delta.

Across methods (a grafting extra; PEFT combines one method at a time): the SVD
types also take sources of other methods whose layer adapters have a fixed
``ΔW`` (``delta_matrix()``, as LoHa's do), in a mixed model; the result is a
LoRA adapter of rank ``svd_rank`` (default: the largest source ``r``).
"""

from __future__ import annotations

import functools
import math

import attrs
import torch
from torch import nn

from grafting import CombinationError
from grafting.merge_utils import ELECTS_SIGN, NEEDS_DENSITY, combine, low_rank
from grafting.protocol import Combination, CombineRequest
from grafting.toolkit import union_of_targets
from grafting_lora.config import LoraConfig

SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
COMBINATION_TYPES = (*SVD_TYPES, *FACTOR_TYPES, "cat")


def combination(request: CombineRequest) -> Combination | None:
    """The new LoRA adapter's config and filler, or ``None`` if the sources are not all LoRA."""
    configs = request.configs
    if not all(isinstance(c, LoraConfig) for c in configs):
        return _across_methods(request) if any(isinstance(c, LoraConfig) for c in configs) else None
    kind = request.combination_type
    if kind not in COMBINATION_TYPES:
        raise CombinationError(f"combination_type={kind!r} is not one of LoRA's {list(COMBINATION_TYPES)}")
    if len(configs) == 1:
        kind = "linear"  # one adapter: scaled as it is, whatever was asked (PEFT does the same)
    for name, config in zip(request.adapters, configs, strict=True):
        assert isinstance(config, LoraConfig)
        refused = {
            "DoRA": config.use_dora,
            "lora_bias": config.lora_bias,
            "trainable_token_indices": config.trainable_token_indices is not None,
            "target_parameters": bool(config.target_parameters),
        }
        for feature, used in refused.items():
            if used:
                raise CombinationError(f"adapter {name!r} uses {feature}, which add_weighted_adapter cannot combine")
    combiner = kind.removesuffix("_svd") if kind != "svd" else "linear"
    if combiner in NEEDS_DENSITY and request.density is None:
        raise CombinationError(f"combination_type={kind!r} prunes: give density (the fraction of entries kept)")
    ranks = [max([c.r, *c.rank_pattern.values()]) for c in configs]  # type: ignore[attr-defined]
    if kind == "cat":
        rank = sum(ranks)
    elif kind in SVD_TYPES:
        rank = request.svd_rank or max(ranks)
    elif len(set(ranks)) > 1:
        raise CombinationError(
            f"combination_type={kind!r} combines the factors themselves, so the adapters need one rank;"
            f" {dict(zip(request.adapters, ranks, strict=True))} differ (use 'cat' or an SVD type)"
        )
    else:
        rank = ranks[0]
    config = attrs.evolve(
        configs[0],
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
        target_modules=union_of_targets([c.target_modules for c in configs]),  # type: ignore[misc]
    )
    options = {
        "density": request.density,
        "majority_sign_method": request.majority_sign_method if combiner in ELECTS_SIGN else "total",
    }

    def fill(target: nn.Module, sources: list[tuple[nn.Module, float]]) -> None:
        if not sources:
            _write(target, torch.zeros_like(_a(target)), torch.zeros_like(_b(target)))
        elif kind == "cat":
            _cat(target, sources)
        elif kind in SVD_TYPES:
            _svd(target, sources, combiner, options, request, rank)
        else:
            _factorwise(target, sources, combiner, options)

    return Combination(config, fill)


def _across_methods(request: CombineRequest) -> Combination:
    """LoRA plus adapters of other methods with a fixed ΔW, combined by an SVD type into a new LoRA adapter."""
    kind = request.combination_type
    if kind not in SVD_TYPES:
        raise CombinationError(
            f"adapters of different methods ({request.peft_types()}) combine only by an SVD type"
            f" {list(SVD_TYPES)}, not combination_type={kind!r}"
        )
    for name, config in zip(request.adapters, request.configs, strict=True):
        if getattr(config, "use_dora", False) or getattr(config, "lora_bias", False):
            raise CombinationError(
                f"adapter {name!r} uses DoRA or lora_bias, which add_weighted_adapter cannot combine"
            )
    combiner = "linear" if kind == "svd" else kind.removesuffix("_svd")
    if combiner in NEEDS_DENSITY and request.density is None:
        raise CombinationError(f"combination_type={kind!r} prunes: give density (the fraction of entries kept)")
    ranks = [r for c in request.configs if isinstance(r := getattr(c, "r", None), int)]
    rank = request.svd_rank or max(ranks)
    first = request.configs[0]
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=union_of_targets([c.target_modules for c in request.configs]),  # type: ignore[misc]
        task_type=first.task_type,
        modules_to_save=first.modules_to_save,
        base_model_name_or_path=first.base_model_name_or_path,
    )
    options = {
        "density": request.density,
        "majority_sign_method": request.majority_sign_method if combiner in ELECTS_SIGN else "total",
    }
    names = dict(zip(request.adapters, request.configs, strict=True))

    def fill(target: nn.Module, sources: list[tuple[nn.Module, float]]) -> None:
        for source, _ in sources:
            if not source.lora_convertible:  # only these promise a delta_matrix()
                kind_of = type(source).__name__
                raise CombinationError(
                    f"a {kind_of} adapter has no fixed ΔW to combine (of {sorted(names)}); across methods only"
                    " adapters that add a weight delta combine"
                )
        _svd(target, sources, combiner, options, request, rank)

    return Combination(config, fill)


def _svd(
    target: nn.Module,
    sources: list[tuple[nn.Module, float]],
    combiner: str,
    options: dict,
    request: CombineRequest,
    rank: int,
) -> None:
    """The sources' ΔW combined, then factored to ``rank`` into the target's A and B."""
    deltas = [s.delta_matrix().detach() for s, _ in sources]
    wide = functools.reduce(torch.promote_types, [d.dtype for d in deltas])
    delta = combine(combiner, [d.to(wide) for d in deltas], [w for _, w in sources], **options)
    clamp, full, driver = request.svd_clamp, request.svd_full_matrices, request.svd_driver
    b, a = low_rank(delta, rank, clamp=clamp, full_matrices=full, driver=driver)
    _write(target, a, b)


# -- the factors of any LoRA layer as matrices: A (r, in·k), B (out, r) ------------------------------------
def _a(adapter: nn.Module) -> torch.Tensor:
    param = adapter.lora_embedding_A if hasattr(adapter, "lora_embedding_A") else adapter.lora_A.weight
    return param.detach().flatten(1)


def _b(adapter: nn.Module) -> torch.Tensor:
    param = adapter.lora_embedding_B if hasattr(adapter, "lora_embedding_B") else adapter.lora_B.weight
    return param.detach().flatten(1)


def _write(target: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
    """Set the target's factors from matrices, zero-padding a smaller rank."""
    a_param = target.lora_embedding_A if hasattr(target, "lora_embedding_A") else target.lora_A.weight
    b_param = target.lora_embedding_B if hasattr(target, "lora_embedding_B") else target.lora_B.weight
    r = a_param.shape[0]
    a_full = a.new_zeros(r, a.shape[1])
    b_full = b.new_zeros(b.shape[0], r)
    a_full[: a.shape[0]] = a
    b_full[:, : b.shape[1]] = b
    a_param.copy_(a_full.reshape(a_param.shape).to(a_param.dtype))
    b_param.copy_(b_full.reshape(b_param.shape).to(b_param.dtype))


def _cat(target: nn.Module, sources: list[tuple[nn.Module, float]]) -> None:
    a = torch.cat([_a(s) * (w * s.scaling) for s, w in sources], dim=0)
    b = torch.cat([_b(s).to(a.dtype) for s, _ in sources], dim=1)
    _write(target, a, b)


def _factorwise(target: nn.Module, sources: list[tuple[nn.Module, float]], combiner: str, options: dict) -> None:
    shapes = {tuple(_a(s).shape) for s, _ in sources}
    if len(shapes) > 1:
        raise CombinationError(
            f"combining LoRA factors needs one rank on each layer; this layer's adapters have A of shapes"
            f" {sorted(shapes)}"
        )
    scaled = [w * s.scaling for s, w in sources]
    root = [math.sqrt(abs(v)) for v in scaled]
    a = combine(combiner, [_a(s) for s, _ in sources], [math.copysign(r, v) for r, v in zip(root, scaled)], **options)
    b = combine(combiner, [_b(s) for s, _ in sources], root, **options)
    _write(target, a, b)
