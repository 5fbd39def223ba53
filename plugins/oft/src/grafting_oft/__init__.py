"""OFT (orthogonal finetuning) for grafting."""

from grafting_oft.config import OFTConfig
from grafting_oft.layers import OFTConv2d, OFTEmbedding, OFTLinear, OFTRotation

__all__ = ["OFTConfig", "OFTConv2d", "OFTEmbedding", "OFTLinear", "OFTRotation"]
