"""LoHaConfig: the options of LoHa, as PEFT writes them."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from grafting.config import AdapterConfig, positive, probability
from grafting.errors import ConfigError
from grafting.matching import pattern_value


def _check_pattern(name: str, *, integer: bool) -> Any:
    def check(instance: Any, attribute: attrs.Attribute, value: dict[str, Any]) -> None:
        if not isinstance(value, dict):
            raise ConfigError(f"LoHaConfig.{name} must be a dict of module pattern -> value, got {value!r}")
        for key, item in value.items():
            wrong_type = not isinstance(item, int) if integer else not isinstance(item, (int, float))
            if isinstance(item, bool) or wrong_type or item <= 0:
                kind = "int" if integer else "number"
                raise ConfigError(f"LoHaConfig.{name}[{key!r}] must be a positive {kind}, got {item!r}")

    return check


@attrs.define(kw_only=True)
class LoHaConfig(AdapterConfig):
    """Low-rank Hadamard product: ``ΔW = (W1a·W1b) ⊙ (W2a·W2b) · alpha / r``.

    ``rank_dropout`` zeroes random output rows of ``ΔW`` in training (the kept
    rows rescaled by their mean); ``module_dropout`` skips the whole adapter
    with that probability in training. ``use_effective_conv2d`` factors the
    kernels of convolutions larger than 1 with two ``r×r×k×k`` cores
    (``hada_t1``/``hada_t2``). ``init_weights=True`` zeroes ``hada_w2_b`` so a
    new adapter computes as the base. ``rank_pattern``/``alpha_pattern``
    override ``r``/``alpha`` for modules matching a key (a regex matched as a
    dotted suffix).
    """

    peft_type: ClassVar[str] = "LOHA"

    r: int = attrs.field(default=8)
    alpha: float = attrs.field(default=8, validator=positive)
    rank_dropout: float = attrs.field(default=0.0, validator=probability)
    module_dropout: float = attrs.field(default=0.0, validator=probability)
    use_effective_conv2d: bool = attrs.field(default=False)
    init_weights: bool = attrs.field(default=True)
    rank_pattern: dict[str, int] = attrs.field(factory=dict, validator=_check_pattern("rank_pattern", integer=True))
    alpha_pattern: dict[str, float] = attrs.field(
        factory=dict, validator=_check_pattern("alpha_pattern", integer=False)
    )

    @r.validator
    def _check_r(self, attribute: attrs.Attribute, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"LoHaConfig.r must be a positive int, got {value!r}")

    @init_weights.validator
    def _check_init(self, attribute: attrs.Attribute, value: Any) -> None:
        if not isinstance(value, bool):
            raise ConfigError(f"LoHaConfig.init_weights must be True or False, got {value!r}")

    @use_effective_conv2d.validator
    def _check_effective(self, attribute: attrs.Attribute, value: Any) -> None:
        if not isinstance(value, bool):
            raise ConfigError(f"LoHaConfig.use_effective_conv2d must be True or False, got {value!r}")

    def rank_for(self, module_name: str) -> int:
        return pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.alpha)

    def scaling_for(self, module_name: str) -> float:
        return self.alpha_for(module_name) / self.rank_for(module_name)
