"""The grafting plugin for adaption prompt: declares the method and builds its attention adapters."""

from __future__ import annotations

from torch import nn

from grafting import Method, UnsupportedLayerError, hookimpl
from grafting_adaption_prompt.attention import KINDS, kind_for, model_type
from grafting_adaption_prompt.config import AdaptionPromptConfig
from grafting_adaption_prompt.layers import AdaptionPrompt


@hookimpl
def grafting_methods() -> list[Method]:
    return [
        Method(
            peft_type="ADAPTION_PROMPT",
            name="adaption_prompt",
            config_class=AdaptionPromptConfig,
            description="Adaption prompt (LLaMA-Adapter): gated attention over learned prompt tokens",
        )
    ]


@hookimpl
def grafting_default_target_modules(config: AdaptionPromptConfig, model: nn.Module) -> list[str] | None:
    found = KINDS.get(model_type(model) or "")
    return [found.attention] if found else None


@hookimpl
def grafting_create_layer_adapter(
    config: AdaptionPromptConfig, base_layer: nn.Module, adapter_name: str, module_name: str, model: nn.Module
) -> AdaptionPrompt | None:
    kind = kind_for(model).kind
    if not kind.fits(base_layer):
        raise UnsupportedLayerError(
            f"{module_name} is a {type(base_layer).__name__}, not an attention module of "
            f"{model_type(model)!r} models (adaption prompt {adapter_name!r}); check target_modules"
        )
    return AdaptionPrompt(kind, config.adapter_len, model.config.hidden_size)
