"""bitsandbytes quantized layers for grafting (a contrib plugin on the public API)."""

from grafting_bnb.codec import dequantize, is_quantized, requantize
from grafting_bnb.quantize import quantize_linears

__all__ = ["dequantize", "is_quantized", "quantize_linears", "requantize"]
