"""BOFT (butterfly orthogonal finetuning) for grafting."""

from grafting_boft.config import BOFTConfig
from grafting_boft.layers import BOFTAdapter, BOFTConv2d, BOFTLinear

__all__ = ["BOFTAdapter", "BOFTConfig", "BOFTConv2d", "BOFTLinear"]
