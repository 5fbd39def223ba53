"""Prompt tuning, P-tuning and prefix tuning for grafting: adapters on the model's inputs."""

from grafting_prefix.base import VirtualTokenAdapter
from grafting_prefix.config import (
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
)
from grafting_prefix.prefix import PrefixAdapter
from grafting_prefix.prompt import PromptAdapter

__all__ = [
    "PrefixAdapter",
    "PrefixTuningConfig",
    "PromptAdapter",
    "PromptEncoderConfig",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "VirtualTokenAdapter",
]
