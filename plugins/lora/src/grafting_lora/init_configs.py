"""The options of LoRA's quantization-aware and data-driven initializations, as PEFT names them.

``LoftQConfig`` (``init_lora_weights="loftq"``), ``EvaConfig`` (``"eva"``) and ``CordaConfig``
(``"corda"``) are small attrs classes nested in ``LoraConfig``; adapter_config.json holds them as
plain dicts (PEFT's ``loftq_config``, ``eva_config``, ``corda_config``), read back through
:func:`sub_config`.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import attrs

from grafting import ConfigError
from grafting.toolkit import boolean, iteration_count, one_of, optional_string


def _probability_closed(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{type(instance).__name__}.{attribute.name} must be a number in [0, 1], got {value!r}")


def _at_least_one(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 1.0:
        raise ConfigError(f"{type(instance).__name__}.{attribute.name} must be a finite number >= 1, got {value!r}")


def _integer(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{type(instance).__name__}.{attribute.name} must be an integer, got {value!r}")


@attrs.define(kw_only=True)
class LoftQConfig:
    """LoftQ: quantize the base weight to ``loftq_bits`` (4: NF4, 8: int8) and start LoRA on the
    quantization error, alternating quantization and a rank-r SVD ``loftq_iter`` times."""

    loftq_bits: int = attrs.field(default=4, validator=one_of(4, 8))
    loftq_iter: int = attrs.field(default=1, validator=iteration_count)


@attrs.define(kw_only=True)
class EvaConfig:
    """EVA (explained variance adaptation): ``A`` from the top right-singular vectors of each layer's
    inputs over a dataloader, ranks redistributed among layers by explained variance.

    ``rho`` caps a layer's rank at ``round(r·rho)`` (1: no redistribution); ``tau`` is the cosine
    similarity of successive components at which a layer counts as converged; ``use_label_mask``
    leaves out positions whose label is ``label_mask_value``; ``whiten`` divides the components by
    the square roots of their singular values; ``adjust_scaling_factors`` scales ``lora_alpha`` with
    the new rank so every layer keeps ``lora_alpha / r``.
    """

    rho: float = attrs.field(default=2.0, validator=_at_least_one)
    tau: float = attrs.field(default=0.99, validator=_probability_closed)
    use_label_mask: bool = attrs.field(default=True, validator=boolean)
    label_mask_value: int = attrs.field(default=-100, validator=_integer)
    whiten: bool = attrs.field(default=False, validator=boolean)
    adjust_scaling_factors: bool = attrs.field(default=True, validator=boolean)


@attrs.define(kw_only=True)
class CordaConfig:
    """CorDA: the SVD of ``W·C`` (``C`` the covariance of the layer's inputs over sample data); the
    adapter starts on the top (``"ipm"``, instruction-previewed) or bottom (``"kpm"``,
    knowledge-preserved) ``r`` components and the base keeps the residual.

    ``cache_file`` / ``covariance_file`` store (and, when present, reuse) the decomposition and the
    covariances; ``use_float16_for_covariance`` accumulates in float16; ``verbose`` shows progress;
    ``prune_temporary_fields`` is accepted for PEFT's sake (grafting keeps no temporary fields).
    """

    cache_file: str | None = attrs.field(default=None, validator=optional_string)
    covariance_file: str | None = attrs.field(default=None, validator=optional_string)
    corda_method: str = attrs.field(default="ipm", validator=one_of("ipm", "kpm"))
    verbose: bool = attrs.field(default=False, validator=boolean)
    use_float16_for_covariance: bool = attrs.field(default=False, validator=boolean)
    prune_temporary_fields: bool = attrs.field(default=True, validator=boolean)


S = TypeVar("S")


def sub_config(cls: type[S], value: Any, where: str) -> S | None:
    """``value`` (None, a ``cls``, or its dict from adapter_config.json) as a ``cls``; ConfigError naming ``where``."""
    if value is None or isinstance(value, cls):
        return value
    if attrs.has(type(value)) or hasattr(value, "__dataclass_fields__"):  # PEFT's dataclass of the same name
        value = {name: getattr(value, name) for name in (f.name for f in attrs.fields(cls)) if hasattr(value, name)}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a {cls.__name__}, a dict of its fields or None, got {value!r}")
    known = {f.name for f in attrs.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"{where} has no option {unknown} ({cls.__name__} takes {sorted(known)})")
    return cls(**value)
