"""LoKrConfig: the options of LoKr, as PEFT writes them."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from grafting import AdapterConfig, ConfigError
from grafting.toolkit import (
    RankAlphaPatterns,
    boolean,
    check_count,
    one_of,
    pattern_of,
    positive,
    positive_int,
    probability,
)


def _factor(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """``-1`` (split each size near its square root) or a positive integer."""
    if type(value) is int and value == -1:
        return
    try:
        check_count(value, "")
    except ConfigError:
        raise ConfigError(f"LoKrConfig.{attribute.name} must be -1 or an integer > 0, got {value!r}") from None


@attrs.define(kw_only=True)
class LoKrConfig(RankAlphaPatterns, AdapterConfig):
    """Low-rank Kronecker product: ``ΔW = (W1 ⊗ W2) · alpha / r``.

    Each weight dimension is split in two factors (near its square root, or
    with ``decompose_factor`` as one of them, as PEFT splits it); ``W1`` is
    the small (a, b) matrix, ``W2`` the (c, d) one with ``out = a·c``,
    ``in = b·d`` (times the kernel for convolutions). ``W2`` is stored as a
    rank-r product ``lokr_w2_a · lokr_w2_b`` when ``r`` is below half its
    larger side, and ``W1`` likewise when ``decompose_both`` is set;
    ``use_effective_conv2d`` stores a convolution's ``W2`` as an r×r kernel
    core ``lokr_t2``. ``rank_dropout`` zeroes random output rows of ``ΔW`` in
    training (the kept rows divided by their mean with ``rank_dropout_scale``);
    ``module_dropout`` skips the adapter. ``init_weights=True`` zeroes ``W1``
    (a new adapter computes as the base), ``"lycoris"`` zeroes ``W2`` instead,
    ``False`` draws every factor at random.
    """

    peft_type: ClassVar[str] = "LOKR"

    r: int = attrs.field(default=8, validator=positive_int)
    alpha: float = attrs.field(default=8, validator=positive)
    rank_dropout: float = attrs.field(default=0.0, validator=probability)
    module_dropout: float = attrs.field(default=0.0, validator=probability)
    use_effective_conv2d: bool = attrs.field(default=False, validator=boolean)
    decompose_both: bool = attrs.field(default=False, validator=boolean)
    decompose_factor: int = attrs.field(default=-1, validator=_factor)
    rank_dropout_scale: bool = attrs.field(default=False, validator=boolean)
    init_weights: bool | str = attrs.field(default=True, validator=one_of(True, False, "lycoris"))
    rank_pattern: dict[str, int] = attrs.field(factory=dict, validator=pattern_of(positive_int))
    alpha_pattern: dict[str, float] = attrs.field(factory=dict, validator=pattern_of(positive))
