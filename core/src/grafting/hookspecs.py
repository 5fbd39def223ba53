"""Where the hook specifications used to live; they are part of :mod:`grafting.protocol` now."""

from grafting.protocol import PROJECT, hookimpl, hookspec

__all__ = ["PROJECT", "hookimpl", "hookspec"]
