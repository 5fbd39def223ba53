"""LoRA for grafting (DoRA, rsLoRA)."""

from grafting_lora.config import LoraConfig
from grafting_lora.layers import LoraConv, LoraEmbedding, LoraLinear

__all__ = ["LoraConfig", "LoraConv", "LoraEmbedding", "LoraLinear"]
