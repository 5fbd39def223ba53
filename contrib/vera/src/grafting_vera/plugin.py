"""The grafting plugin for VeRA: one set of projections per adapter, one VeraLinear per target."""

from __future__ import annotations

from torch import nn

from grafting import Method, UnsupportedLayerError, hookimpl
from grafting.toolkit import in_out_features, is_linear, query_value_projections, warn_fan_in_fan_out
from grafting_vera.config import VeraConfig
from grafting_vera.layers import VeraLinear, VeraProjections
from grafting_vera.saved import check_shapes


@hookimpl
def grafting_methods() -> list[Method]:
    return [
        Method(
            peft_type="VERA",
            name="vera",
            config_class=VeraConfig,
            description="VeRA: shared frozen random projections, trained scaling vectors",
        )
    ]


@hookimpl
def grafting_default_target_modules(config: VeraConfig, model: nn.Module) -> list[str] | None:
    return query_value_projections(model)


@hookimpl
def grafting_create_shared_state(config: VeraConfig, targets: dict[str, nn.Module]) -> VeraProjections | None:
    sizes = [in_out_features(layer) for layer in targets.values() if is_linear(layer)]
    if not sizes:
        raise UnsupportedLayerError(
            f"VeRA adapts linear layers (nn.Linear, Conv1D) only; none of the targets is one: {sorted(targets)[:5]}"
        )
    n_in, n_out = max(s[0] for s in sizes), max(s[1] for s in sizes)
    return VeraProjections(config.r, n_in, n_out, config.projection_prng_key, config.save_projection)


@hookimpl
def grafting_create_layer_adapter(
    config: VeraConfig, base_layer: nn.Module, shared: VeraProjections | None
) -> VeraLinear | None:
    if not is_linear(base_layer) or shared is None:
        return None
    warn_fan_in_fan_out(config, base_layer)
    return VeraLinear(base_layer, shared, config.vera_dropout, config.d_initial, config.init_weights)


@hookimpl
def grafting_check_saved_shapes(config: VeraConfig, shapes: dict[str, tuple[int, ...]]) -> list[str] | None:
    return check_shapes(config, shapes)
