"""The grafting-bnb plugin: the weight codec hooks for bitsandbytes layers.

bitsandbytes is imported only when a layer from it shows up, so installing
this plugin costs nothing to programs that never quantize.
"""

from __future__ import annotations

import torch
from torch import nn

from grafting import hookimpl


def _from_bitsandbytes(layer: nn.Module) -> bool:
    return type(layer).__module__.startswith("bitsandbytes")


@hookimpl
def grafting_dense_weight(layer: nn.Module) -> torch.Tensor | None:
    if not _from_bitsandbytes(layer):
        return None
    from grafting_bnb.codec import dequantize, is_quantized

    return dequantize(layer) if is_quantized(layer) else None


@hookimpl
def grafting_store_weight(layer: nn.Module, matrix: torch.Tensor) -> bool | None:
    if not _from_bitsandbytes(layer):
        return None
    from grafting_bnb.codec import is_quantized, requantize

    if not is_quantized(layer):
        return None
    requantize(layer, matrix)
    return True


@hookimpl
def grafting_parameter_count(param: torch.Tensor) -> int | None:
    """bitsandbytes' 4-bit parameters pack two weights into each uint8 element."""
    if type(param).__name__ != "Params4bit" or not type(param).__module__.startswith("bitsandbytes"):
        return None
    return 2 * param.numel()
