"""Embeddings that scale their lookup (Gemma 3's ``embed_scale``): the adapter's delta is scaled alike."""

from __future__ import annotations

import torch
from torch import nn

from grafting import UnsupportedLayerError


def embed_scale(layer: nn.Module) -> torch.Tensor | None:
    """The scalar ``layer`` multiplies its looked-up rows by (``layer.embed_scale``), or ``None``.

    A base embedding that computes ``W[x] · s`` merges ``W + ΔW`` into
    ``(W + ΔW)[x] · s``, so the unmerged delta must be ``ΔW[x] · s`` too.
    """
    scale = getattr(layer, "embed_scale", None)
    if scale is None:
        return None
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return torch.tensor(float(scale))
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return scale
    raise UnsupportedLayerError(
        f"{type(layer).__name__}.embed_scale is {scale!r}; LoRA on a scaled embedding needs one scalar"
    )
