"""VeRA for grafting: frozen random projections shared by every layer, two trained vectors per layer."""

from grafting_vera.config import VeraConfig
from grafting_vera.layers import VeraLinear, VeraProjections

__all__ = ["VeraConfig", "VeraLinear", "VeraProjections"]
