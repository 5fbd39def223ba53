"""bitsandbytes quantized layers for grafting (a contrib plugin on the public API).

The names below load bitsandbytes on first use only.
"""

from __future__ import annotations

from typing import Any

__all__ = ["dequantize", "is_quantized", "quantize_linears", "requantize"]


def __getattr__(name: str) -> Any:
    if name in ("dequantize", "is_quantized", "requantize"):
        from grafting_bnb import codec

        return getattr(codec, name)
    if name == "quantize_linears":
        from grafting_bnb.quantize import quantize_linears

        return quantize_linears
    raise AttributeError(f"module 'grafting_bnb' has no attribute {name!r}")
