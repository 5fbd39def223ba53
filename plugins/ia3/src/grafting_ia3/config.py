"""IA3Config: which layers IA3 rescales, and whether at their input or output."""

from __future__ import annotations

import re
from typing import Any, ClassVar

import attrs

from grafting import AdapterConfig, ConfigError
from grafting.toolkit import boolean, model_type, module_names, names, one_of
from grafting_ia3.defaults import defaults_for


def _check_subset(feedforward: list[str], targets: list[str], what: str) -> None:
    extra = sorted(set(feedforward) - set(targets))
    if extra:
        raise ConfigError(
            f"IA3Config.feedforward_modules must be a subset of {what}: {extra} are not in {sorted(targets)}"
        )


def is_feedforward(module_name: str, feedforward: list[str] | str) -> bool:
    """Whether a targeted module scales its input: a regex full match, or a name suffix as PEFT matches it.

    A list entry matches any module name that ends with it, without a dot
    boundary (``"o"`` matches ``"...wo"``), exactly as PEFT decides; the
    saved ``ia3_l`` shapes depend on it.
    """
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, module_name) is not None
    return any(module_name.endswith(name) for name in feedforward)


@attrs.define(kw_only=True)
class IA3Config(AdapterConfig):
    """IA3: a learned vector ``l`` per targeted layer rescales activations.

    Targets in ``feedforward_modules`` compute ``W (l ⊙ x) + b``; the other
    targets ``l ⊙ (W x + b)``. ``feedforward_modules`` must be a subset of
    ``target_modules``. With ``target_modules=None`` both default to the
    model type's entry in :data:`grafting_ia3.defaults.DEFAULTS`; with
    ``feedforward_modules=None`` alone, the feed-forward default applies.
    ``init_ia3_weights=False`` starts from random vectors instead of ones.
    ``fan_in_fan_out`` is accepted for PEFT's sake; grafting reads each
    layer's own weight layout. ``precision`` (grafting's own) picks the
    dtype a half-precision activation is scaled in (see :class:`IA3Adapter`).
    """

    peft_type: ClassVar[str] = "IA3"
    #: Every option PEFT 0.21 writes for IA3 is implemented, so nothing is inert.
    inert_keys: ClassVar[dict[str, Any]] = {}
    #: Options PEFT's IA3Config does not have: written only when set.
    absent_in_peft: ClassVar[tuple[str, ...]] = ("layers_to_transform", "layers_pattern", "precision")

    feedforward_modules: list[str] | str | None = attrs.field(default=None, converter=module_names, validator=names)
    fan_in_fan_out: bool = attrs.field(default=False, validator=boolean)
    init_ia3_weights: bool = attrs.field(default=True, validator=boolean)
    #: grafting's own: ``None``/``"input"`` scales a bf16/fp16 activation in its dtype with the
    #: float32 vector cast down (and folds it into the weight where it can); ``"adapter"`` in
    #: float32, PEFT's numerics. Written to adapter_config.json only when set.
    precision: str | None = attrs.field(default=None, validator=one_of(None, "input", "adapter"))

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            _check_subset(self.feedforward_modules, self.target_modules, "target_modules")

    def feedforward_for(self, model: Any) -> list[str] | str:
        """``feedforward_modules``, or the default of ``model``'s type when it is ``None``."""
        if self.feedforward_modules is not None:
            return self.feedforward_modules
        defaults = defaults_for(model)
        if defaults is None:
            missing = (
                "feedforward_modules" if self.target_modules is not None else "target_modules and feedforward_modules"
            )
            raise ConfigError(
                f"IA3Config: {missing} not set and no default is known for model type "
                f"{model_type(model) or type(model).__name__!r}; set {missing} (feedforward_modules=[] for none)"
            )
        return list(defaults.feedforward)

    def validate_for_model(self, model: Any) -> None:
        feedforward = self.feedforward_for(model)
        defaults = defaults_for(model)
        if self.target_modules is None and isinstance(feedforward, list) and defaults is not None:
            kind = model_type(model)
            _check_subset(feedforward, list(defaults.targets), f"the default target_modules of model type {kind!r}")
