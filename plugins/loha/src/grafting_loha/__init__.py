"""LoHa (low-rank Hadamard product) for grafting."""

from grafting_loha.config import LoHaConfig
from grafting_loha.layers import LoHaAdapter, LoHaConv, LoHaLinear

__all__ = ["LoHaAdapter", "LoHaConfig", "LoHaConv", "LoHaLinear"]
