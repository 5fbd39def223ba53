"""The grafting plugin for LoKr: declares the method and builds its layer adapters."""

from __future__ import annotations

from torch import nn

from grafting import Method, hookimpl
from grafting.toolkit import query_value_projections
from grafting_lokr.config import LoKrConfig
from grafting_lokr.layers import LoKrAdapter, LoKrConv, LoKrLinear
from grafting_lokr.saved import check_shapes


@hookimpl
def grafting_methods() -> list[Method]:
    return [
        Method(peft_type="LOKR", name="lokr", config_class=LoKrConfig, description="Low-rank Kronecker product (LoKr)")
    ]


@hookimpl
def grafting_default_target_modules(model: nn.Module) -> list[str] | None:
    return query_value_projections(model)


@hookimpl
def grafting_create_layer_adapter(config: LoKrConfig, base_layer: nn.Module, module_name: str) -> LoKrAdapter | None:
    options = {
        "decompose_both": config.decompose_both,
        "decompose_factor": config.decompose_factor,
        "rank_dropout": config.rank_dropout,
        "module_dropout": config.module_dropout,
        "rank_dropout_scale": config.rank_dropout_scale,
        "init_weights": config.init_weights,
    }
    r, scaling = config.rank_for(module_name), config.scaling_for(module_name)
    if isinstance(base_layer, nn.Linear):
        return LoKrLinear(base_layer, r, scaling, **options)
    if isinstance(base_layer, (nn.Conv1d, nn.Conv2d)):
        return LoKrConv(base_layer, r, scaling, effective=config.use_effective_conv2d, **options)
    return None


@hookimpl
def grafting_check_saved_shapes(config: LoKrConfig, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    return check_shapes(config, shapes)
