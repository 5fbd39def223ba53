"""The grafting plugin for the virtual-token methods: declares them and builds their model adapters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from grafting import Method, ModelAdapter, hookimpl
from grafting_prefix import factory
from grafting_prefix.config import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, PromptTuningInit


class _Builds:
    """The hooks of one virtual-token method: its model adapter comes from ``build(config, model)``."""

    def __init__(self, build: Callable[[Any, nn.Module], ModelAdapter]) -> None:
        self.build = build

    @hookimpl
    def grafting_create_model_adapter(self, config: Any, model: nn.Module) -> ModelAdapter:
        return self.build(config, model)


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
            hooks=_Builds(factory.prompt_tuning),
        ),
        Method(
            peft_type="P_TUNING",
            name="p_tuning",
            config_class=PromptEncoderConfig,
            level="model",
            description="Virtual-token embeddings computed by a trained MLP or LSTM encoder",
            hooks=_Builds(factory.p_tuning),
        ),
        Method(
            peft_type="PREFIX_TUNING",
            name="prefix_tuning",
            config_class=PrefixTuningConfig,
            level="model",
            description="Learned keys and values for virtual positions in every attention layer",
            hooks=_Builds(factory.prefix_tuning),
        ),
    ]
