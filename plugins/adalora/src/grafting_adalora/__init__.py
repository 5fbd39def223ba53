"""AdaLoRA for grafting: SVD-form low-rank adapters whose ranks are allocated while training."""

from grafting_adalora.allocator import RankAllocator
from grafting_adalora.config import AdaLoraConfig
from grafting_adalora.layers import AdaLoraAdapter

__all__ = ["AdaLoraAdapter", "AdaLoraConfig", "RankAllocator"]
