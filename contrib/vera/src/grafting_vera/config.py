"""VeraConfig: the options of VeRA, as PEFT writes them."""

from __future__ import annotations

import numbers
from typing import Any, ClassVar

import attrs

from grafting import AdapterConfig, ConfigError
from grafting.toolkit import boolean, one_of, positive_int, probability, trainable_biases


def _real(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"VeraConfig.{attribute.name} must be a number, got {value!r}")


def _seed(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ConfigError(
            f"VeraConfig.{attribute.name} must be an integer >= 0 (a torch.Generator seed), got {value!r}"
        )


@attrs.define(kw_only=True)
class VeraConfig(AdapterConfig):
    """VeRA: ``ΔW = diag(λ_b) · B · diag(λ_d) · A`` with ``A``, ``B`` frozen and shared by all layers.

    ``A`` (``r × in``) and ``B`` (``out × r``) are drawn once per adapter, as
    large as the largest targeted layer, from a ``torch.Generator`` seeded
    with ``projection_prng_key`` (kaiming-uniform, as PEFT draws them); each
    layer uses their top-left slice and trains ``λ_d`` (``r``) and ``λ_b``
    (``out``). ``save_projection`` writes ``A`` and ``B`` into the file
    (``base_model.vera_A``/``vera_B``); without it they are drawn again from
    the key when loading. ``init_weights=True`` starts with ``λ_b = 0`` and
    ``λ_d = d_initial`` (a new adapter computes as the base). ``bias`` trains
    no bias, every bias (``"all"``) or those of adapted layers (``"vera_only"``).
    """

    peft_type: ClassVar[str] = "VERA"
    #: Shared options PEFT's VeraConfig does not have: written only when set.
    absent_in_peft: ClassVar[tuple[str, ...]] = ("exclude_modules",)

    r: int = attrs.field(default=256, validator=positive_int)
    projection_prng_key: int = attrs.field(default=0, validator=_seed)
    save_projection: bool = attrs.field(default=True, validator=boolean)
    vera_dropout: float = attrs.field(default=0.0, validator=probability)
    d_initial: float = attrs.field(default=0.1, validator=_real)
    fan_in_fan_out: bool = attrs.field(default=False, validator=boolean)
    bias: str = attrs.field(default="none", validator=one_of("none", "all", "vera_only"))
    init_weights: bool = attrs.field(default=True, validator=boolean)

    def trainable_base_parameters(self, model: Any, adapted_paths: list[str]) -> list[str]:
        return trainable_biases(model, adapted_paths, self.bias)
