"""The grafting plugin for LN tuning: declares the method and copies each targeted layer."""

from __future__ import annotations

from torch import nn

from grafting import Method, hookimpl
from grafting.toolkit import default_targets
from grafting_ln_tuning.config import DEFAULT_TARGETS, LNTuningConfig
from grafting_ln_tuning.layers import LNTuningAdapter

#: Where a saved tensor of a targeted layer lives: ``base_model.model.<path>.ln_tuning_layers.<name>``.
MARK = ".ln_tuning_layers."


@hookimpl
def grafting_methods() -> list[Method]:
    return [
        Method(
            peft_type="LN_TUNING",
            name="ln_tuning",
            config_class=LNTuningConfig,
            description="LN tuning: trained copies of normalisation layers",
        )
    ]


@hookimpl
def grafting_default_target_modules(model: nn.Module) -> list[str] | None:
    return default_targets(DEFAULT_TARGETS, model)


@hookimpl
def grafting_create_layer_adapter(base_layer: nn.Module) -> LNTuningAdapter | None:
    """Any module with floating-point parameters (PEFT copies any module); one without has nothing to train."""
    if not any(p.is_floating_point() for p in base_layer.parameters()):
        return None
    return LNTuningAdapter(base_layer)


@hookimpl
def grafting_check_saved_shapes(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Every tensor must belong to a layer's copy (the copy's shapes are the layer's, which the file cannot tell)."""
    return [
        f"{key}: not an LN-tuning tensor (expected <layer>{MARK}<name>)" for key in sorted(shapes) if MARK not in key
    ]
