"""IA3 for grafting: learned vectors that rescale a layer's input or output."""

from grafting_ia3.config import IA3Config
from grafting_ia3.layers import IA3Adapter, IA3Input, IA3Output

__all__ = ["IA3Adapter", "IA3Config", "IA3Input", "IA3Output"]
