"""The grafting plugin for LoRA: declares the method and builds its layer adapters."""

from __future__ import annotations

import warnings

from torch import nn

from grafting import GraftingWarning, Method, UnsupportedLayerError, hookimpl
from grafting.protocol import Combination, CombineRequest
from grafting.toolkit import is_conv, is_linear, query_value_projections, warn_fan_in_fan_out
from grafting_lora.combine import combination
from grafting_lora.config import LoraConfig
from grafting_lora.layers import LoraConv, LoraEmbedding, LoraLinear
from grafting_lora.saved import check_shapes


@hookimpl
def grafting_methods() -> list[Method]:
    return [
        Method(peft_type="LORA", name="lora", config_class=LoraConfig, description="Low-rank adaptation (DoRA, rsLoRA)")
    ]


@hookimpl
def grafting_default_target_modules(config: object, model: nn.Module) -> list[str] | None:
    if not isinstance(config, LoraConfig):
        return None
    return query_value_projections(model)


@hookimpl
def grafting_create_layer_adapter(
    config: object, base_layer: nn.Module, adapter_name: str, module_name: str
) -> nn.Module | None:
    if not isinstance(config, LoraConfig):
        return None
    r, scaling = config.rank_for(module_name), config.scaling_for(module_name)
    if config.lora_bias and getattr(base_layer, "bias", None) is None and not isinstance(base_layer, nn.Embedding):
        warnings.warn(  # as PEFT warns; merging such an adapter is refused
            f"LoraConfig.lora_bias=True on a {type(base_layer).__name__} without a bias: the adapter trains a bias"
            " but cannot be merged",
            GraftingWarning,
            stacklevel=2,
        )
    if is_linear(base_layer):
        warn_fan_in_fan_out(config, base_layer)
        return _with_precision(
            LoraLinear(
                base_layer, r, scaling, config.lora_dropout, config.init_lora_weights, config.use_dora, config.lora_bias
            ),
            config,
        )
    if config.use_dora:
        raise UnsupportedLayerError(
            f"{module_name}: DoRA is supported on linear layers only, not on {type(base_layer).__name__}"
        )
    if isinstance(base_layer, nn.Embedding):
        return LoraEmbedding(base_layer, r, scaling, config.init_lora_weights)
    if is_conv(base_layer):
        return _with_precision(
            LoraConv(base_layer, r, scaling, config.lora_dropout, config.init_lora_weights, config.lora_bias), config
        )
    return None


def _with_precision(adapter: LoraLinear | LoraConv, config: LoraConfig) -> LoraLinear | LoraConv:
    if config.precision is not None:
        adapter.precision = config.precision  # type: ignore[assignment]
    return adapter


@hookimpl
def grafting_check_saved_shapes(config: object, shapes: dict[str, tuple[int, ...]]) -> list[str] | None:
    if not isinstance(config, LoraConfig):
        return None
    return check_shapes(config, shapes)


@hookimpl
def grafting_combine_adapters(request: CombineRequest, model: nn.Module) -> Combination | None:
    return combination(request)
