"""BOFTConfig: the options of BOFT, as PEFT writes them."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from grafting import AdapterConfig, ConfigError
from grafting.toolkit import boolean, check_count, one_of, positive_int, probability, trainable_biases


def count_or_zero(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """An integer >= 0 (0 means: derived from the other option)."""
    check_count(value, f"{type(instance).__name__}.{attribute.name}", minimum=0)


@attrs.define(kw_only=True)
class BOFTConfig(AdapterConfig):
    """Butterfly orthogonal finetuning: the input rotated by a product of block-diagonal rotations.

    A layer's ``n`` inputs (``in·k·k`` for a convolution) are cut into ``boft_block_num`` blocks of
    ``boft_block_size``: give exactly one of the two. ``boft_n_butterfly_factor`` factors are
    multiplied; factor ``i`` pairs blocks ``2^(i-1)`` blocks apart (a butterfly), so the product
    mixes ``2^(f-1)`` blocks. Each block is the Cayley transform of the skew part of a trained
    matrix (``boft_R``, zero at ``init_weights=True``); ``boft_s`` scales the output channels.
    ``boft_dropout`` makes that fraction of one random factor's blocks the identity in training.
    """

    peft_type: ClassVar[str] = "BOFT"

    boft_block_size: int = attrs.field(default=4, validator=count_or_zero)
    boft_block_num: int = attrs.field(default=0, validator=count_or_zero)
    boft_n_butterfly_factor: int = attrs.field(default=1, validator=positive_int)
    boft_dropout: float = attrs.field(default=0.0, validator=probability)
    fan_in_fan_out: bool = attrs.field(default=False, validator=boolean)
    bias: str = attrs.field(default="none", validator=one_of("none", "all", "boft_only"))
    init_weights: bool = attrs.field(default=True, validator=boolean)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise ConfigError(
                f"BOFTConfig: give exactly one of boft_block_size ({self.boft_block_size}) and boft_block_num"
                f" ({self.boft_block_num}) as non-zero (their product is a layer's input size); set the other to 0"
            )

    def trainable_base_parameters(self, model: Any, adapted_paths: list[str]) -> list[str]:
        return trainable_biases(model, adapted_paths, self.bias)
