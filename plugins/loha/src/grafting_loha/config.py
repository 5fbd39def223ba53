"""LoHaConfig: the options of LoHa, as PEFT writes them."""

from __future__ import annotations

from typing import ClassVar

import attrs

from grafting import AdapterConfig
from grafting.toolkit import (
    RankAlphaPatterns,
    boolean,
    pattern_of,
    positive,
    positive_int,
    probability,
)


@attrs.define(kw_only=True)
class LoHaConfig(RankAlphaPatterns, AdapterConfig):
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

    r: int = attrs.field(default=8, validator=positive_int)
    alpha: float = attrs.field(default=8, validator=positive)
    rank_dropout: float = attrs.field(default=0.0, validator=probability)
    module_dropout: float = attrs.field(default=0.0, validator=probability)
    use_effective_conv2d: bool = attrs.field(default=False, validator=boolean)
    init_weights: bool = attrs.field(default=True, validator=boolean)
    rank_pattern: dict[str, int] = attrs.field(factory=dict, validator=pattern_of(positive_int))
    alpha_pattern: dict[str, float] = attrs.field(factory=dict, validator=pattern_of(positive))
