"""The grafting plugin for LoHa: declares the method and builds its layer adapters."""

from __future__ import annotations

from torch import nn

from grafting import Method, hookimpl
from grafting.toolkit import query_value_projections
from grafting_loha.config import LoHaConfig
from grafting_loha.layers import LoHaConv, LoHaLinear


@hookimpl
def grafting_methods() -> list[Method]:
    return [
        Method(peft_type="LOHA", name="loha", config_class=LoHaConfig, description="Low-rank Hadamard product (LoHa)")
    ]


@hookimpl
def grafting_default_target_modules(config: LoHaConfig, model: nn.Module) -> list[str] | None:
    return query_value_projections(model)


@hookimpl
def grafting_create_layer_adapter(
    config: LoHaConfig, base_layer: nn.Module, adapter_name: str, module_name: str
) -> nn.Module | None:
    r, scaling = config.rank_for(module_name), config.scaling_for(module_name)
    options = {
        "rank_dropout": config.rank_dropout,
        "module_dropout": config.module_dropout,
        "init_weights": config.init_weights,
    }
    if isinstance(base_layer, nn.Linear):
        return LoHaLinear(base_layer, r, scaling, **options)
    if isinstance(base_layer, (nn.Conv1d, nn.Conv2d)):
        return LoHaConv(base_layer, r, scaling, effective=config.use_effective_conv2d, **options)
    return None
