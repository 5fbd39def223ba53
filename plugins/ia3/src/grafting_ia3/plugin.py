"""The grafting plugin for IA3: declares the method, its default targets, and builds its adapters."""

from __future__ import annotations

import warnings

from torch import nn

from grafting import GraftingWarning, Method, hookimpl
from grafting.combine import Combination, CombineRequest
from grafting.weights import is_hf_conv1d
from grafting_ia3.combine import combination
from grafting_ia3.config import IA3Config, is_feedforward
from grafting_ia3.defaults import defaults_for
from grafting_ia3.layers import IA3Adapter, IA3Input, IA3Output, supports


@hookimpl
def grafting_methods() -> list[Method]:
    return [Method(peft_type="IA3", name="ia3", config_class=IA3Config, description="IA3: learned activation scaling")]


@hookimpl
def grafting_default_target_modules(config: object, model: nn.Module) -> list[str] | None:
    if not isinstance(config, IA3Config):
        return None
    defaults = defaults_for(model)
    return list(defaults.targets) if defaults else None


@hookimpl
def grafting_create_layer_adapter(
    config: object, base_layer: nn.Module, adapter_name: str, module_name: str, model: nn.Module
) -> IA3Adapter | None:
    if not isinstance(config, IA3Config) or not supports(base_layer):
        return None
    if (isinstance(base_layer, nn.Linear) or is_hf_conv1d(base_layer)) and config.fan_in_fan_out != is_hf_conv1d(
        base_layer
    ):
        warnings.warn(
            f"{module_name}: fan_in_fan_out={config.fan_in_fan_out} does not fit a {type(base_layer).__name__};"
            " grafting uses the layer's own weight layout",
            GraftingWarning,
            stacklevel=2,
        )
    kind = IA3Input if is_feedforward(module_name, config.feedforward_for(model)) else IA3Output
    return kind(base_layer, init=config.init_ia3_weights, where=f"{module_name} (IA3 adapter {adapter_name!r})")


@hookimpl
def grafting_combine_adapters(request: CombineRequest, model: nn.Module) -> Combination | None:
    return combination(request, model)
