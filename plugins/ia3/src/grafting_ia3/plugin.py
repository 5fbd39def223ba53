"""The grafting plugin for IA3: declares the method, its default targets, and builds its adapters."""

from __future__ import annotations

from torch import nn

from grafting import Method, hookimpl
from grafting.protocol import Combination, CombineRequest
from grafting.toolkit import warn_fan_in_fan_out
from grafting_ia3.combine import combination
from grafting_ia3.config import IA3Config, is_feedforward
from grafting_ia3.defaults import defaults_for
from grafting_ia3.layers import IA3Adapter, IA3Input, IA3Output, supports


@hookimpl
def grafting_methods() -> list[Method]:
    return [Method(peft_type="IA3", name="ia3", config_class=IA3Config, description="IA3: learned activation scaling")]


@hookimpl
def grafting_default_target_modules(config: IA3Config, model: nn.Module) -> list[str] | None:
    defaults = defaults_for(model)
    return list(defaults.targets) if defaults else None


@hookimpl
def grafting_create_layer_adapter(
    config: IA3Config, base_layer: nn.Module, adapter_name: str, module_name: str, model: nn.Module
) -> IA3Adapter | None:
    if not supports(base_layer):
        return None
    warn_fan_in_fan_out(config, base_layer)  # once per layer type, not once per layer
    kind = IA3Input if is_feedforward(module_name, config.feedforward_for(model)) else IA3Output
    adapter = kind(base_layer, init=config.init_ia3_weights, where=f"{module_name} (IA3 adapter {adapter_name!r})")
    if config.precision is not None:
        adapter.precision = config.precision  # type: ignore[assignment]
    return adapter


@hookimpl
def grafting_combine_adapters(request: CombineRequest, model: nn.Module) -> Combination | None:
    return combination(request, model)
