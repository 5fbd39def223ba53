"""Where ``ModelAdapter`` used to live; it is part of :mod:`grafting.protocol` now."""

from grafting.protocol import ModelAdapter

__all__ = ["ModelAdapter"]
