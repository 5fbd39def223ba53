"""Adaption prompt (LLaMA-Adapter) for grafting: gated attention over learned prompt tokens."""

from grafting_adaption_prompt.config import AdaptionPromptConfig
from grafting_adaption_prompt.layers import AdaptionPrompt

__all__ = ["AdaptionPrompt", "AdaptionPromptConfig"]
