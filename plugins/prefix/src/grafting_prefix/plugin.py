"""The grafting plugin for the virtual-token methods: declares them and builds their model adapters."""

from __future__ import annotations

from torch import nn

from grafting import Method, ModelAdapter, hookimpl
from grafting_prefix import factory
from grafting_prefix.config import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, PromptTuningInit


@hookimpl
def grafting_methods() -> list[Method]:
    return [
        Method(
            peft_type="PROMPT_TUNING",
            name="prompt_tuning",
            config_class=PromptTuningConfig,
            level="model",
            description="Learned virtual-token embeddings prepended to the input",
            exports={"PromptTuningInit": PromptTuningInit},
        ),
        Method(
            peft_type="P_TUNING",
            name="p_tuning",
            config_class=PromptEncoderConfig,
            level="model",
            description="Virtual-token embeddings computed by a trained MLP or LSTM encoder",
        ),
        Method(
            peft_type="PREFIX_TUNING",
            name="prefix_tuning",
            config_class=PrefixTuningConfig,
            level="model",
            description="Learned keys and values for virtual positions in every attention layer",
        ),
    ]


@hookimpl
def grafting_create_model_adapter(config: object, model: nn.Module, adapter_name: str) -> ModelAdapter | None:
    if isinstance(config, PromptTuningConfig):
        return factory.prompt_tuning(config, model)
    if isinstance(config, PromptEncoderConfig):
        return factory.p_tuning(config, model)
    if isinstance(config, PrefixTuningConfig):
        return factory.prefix_tuning(config, model)
    return None
