"""LoKr (low-rank Kronecker product) for grafting."""

from grafting_lokr.config import LoKrConfig
from grafting_lokr.layers import LoKrAdapter, LoKrConv, LoKrLinear

__all__ = ["LoKrAdapter", "LoKrConfig", "LoKrConv", "LoKrLinear"]
