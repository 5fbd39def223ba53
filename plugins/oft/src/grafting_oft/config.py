"""OFTConfig: the options of OFT, as PEFT writes them."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import attrs

from grafting import AdapterConfig, ConfigError, GraftingWarning
from grafting.toolkit import boolean, check_count, one_of, positive, positive_int, probability, trainable_biases


def count_or_zero(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """An integer >= 0 (0 means: derived from the other option)."""
    check_count(value, f"{type(instance).__name__}.{attribute.name}", minimum=0)


#: The PEFT release whose OFT format and parameterization this plugin reads and writes.
PEFT_FORMAT = "0.21.2"


@attrs.define(kw_only=True)
class OFTConfig(AdapterConfig):
    """Orthogonal finetuning: the layer's input is rotated by a block-diagonal orthogonal ``R``.

    Each targeted layer's input (of size ``n``) is cut into ``r`` blocks of ``oft_block_size``;
    give exactly one of the two (the other is derived per layer, and a size that does not
    divide ``n`` is moved to the nearest divisor, with a warning, as PEFT does). Each block's
    rotation is the Cayley transform of a skew-symmetric matrix whose upper triangle is
    trained (``oft_R.weight``, zero at ``init_weights=True``, so a new adapter computes as the
    base); ``use_cayley_neumann`` replaces the inverse by ``num_cayley_neumann_terms`` terms of
    its Neumann series (PEFT's default). ``block_share`` trains one block for all; ``coft``
    keeps each block's skew matrix within ``eps`` (constrained OFT). ``module_dropout``
    replaces that fraction of the blocks by the identity in training.
    """

    peft_type: ClassVar[str] = "OFT"

    r: int = attrs.field(default=0, validator=count_or_zero)
    oft_block_size: int = attrs.field(default=32, validator=count_or_zero)
    module_dropout: float = attrs.field(default=0.0, validator=probability)
    fan_in_fan_out: bool = attrs.field(default=False, validator=boolean)
    bias: str = attrs.field(default="none", validator=one_of("none", "all", "oft_only"))
    init_weights: bool = attrs.field(default=True, validator=boolean)
    coft: bool = attrs.field(default=False, validator=boolean)
    eps: float = attrs.field(default=6e-5, validator=positive)
    block_share: bool = attrs.field(default=False, validator=boolean)
    use_cayley_neumann: bool = attrs.field(default=True, validator=boolean)
    num_cayley_neumann_terms: int = attrs.field(default=5, validator=positive_int)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ConfigError(
                f"OFTConfig: give exactly one of r ({self.r}) and oft_block_size ({self.oft_block_size}) as"
                " non-zero (r blocks of oft_block_size make up a layer's input size); set the other to 0"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> OFTConfig:
        """PEFT's reading, with its warning: a Cayley-Neumann file from before PEFT 0.18 used another series."""
        config = super().from_dict(data, source=source)
        if config.use_cayley_neumann and _before_0_18(data.get("peft_version")):
            warnings.warn(
                f"{source}: this OFT adapter uses the Cayley-Neumann series and was saved by PEFT"
                f" {data.get('peft_version') or 'before 0.18'}; PEFT 0.18 changed the series, so it computes"
                " differently now (retrain it, or use PEFT 0.17)",
                GraftingWarning,
                stacklevel=2,
            )
        return config

    def to_dict(self) -> dict[str, Any]:
        """PEFT's dict, with the PEFT version whose parameterization it follows when none was read.

        PEFT warns about (and asks to retrain) a Cayley-Neumann file without ``peft_version``
        or older than 0.18, whose series it changed; grafting computes 0.21's series.
        """
        out = super().to_dict()
        out.setdefault("peft_version", PEFT_FORMAT)
        return dict(sorted(out.items()))

    def trainable_base_parameters(self, model: Any, adapted_paths: list[str]) -> list[str]:
        return trainable_biases(model, adapted_paths, self.bias)


def _before_0_18(version: Any) -> bool:
    """Whether a ``peft_version`` is older than 0.18 (missing: PEFT wrote none before 0.18)."""
    if version is None:
        return True
    try:
        major, minor = (int(part) for part in str(version).partition("@")[0].split(".")[:2])
    except ValueError:
        return False
    return (major, minor) < (0, 18)
