"""IA3 adapters: a vector ``ia3_l`` that scales a layer's output (OUTPUT site) or input (INPUT site).

``ia3_l`` has PEFT's shape, so the saved keys and tensors are PEFT's: on
``nn.Linear`` and ``Conv1D`` ``(out, 1)`` for output scaling and ``(1, in)``
for input scaling; on ``nn.Conv2d``/``nn.Conv3d`` ``(1, channels, 1, ...)``.
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import torch
from torch import nn

from grafting.errors import GraftingWarning, MergeError
from grafting.layer import InputAdapter, LayerAdapter, OutputAdapter
from grafting.weights import in_out_features, is_hf_conv1d

SUPPORTED_CONVS = (nn.Conv2d, nn.Conv3d)


def supports(layer: nn.Module) -> bool:
    """The base layers IA3 adapts: ``nn.Linear``, transformers' ``Conv1D``, ``nn.Conv2d``, ``nn.Conv3d``."""
    return isinstance(layer, (nn.Linear, *SUPPORTED_CONVS)) or is_hf_conv1d(layer)


def unmerge_tolerance(dtype: torch.dtype) -> float:
    """Entries of ``l`` closer to zero than this are not divided out of a ``dtype`` weight.

    Below it ``W ⊙ l`` leaves the normal range of ``dtype`` (or is zero), so
    ``W`` cannot be recovered from the merged weight.
    """
    return max(1e-6, torch.finfo(dtype).tiny ** 0.5)


class IA3Adapter(LayerAdapter):
    """The vector ``ia3_l`` and how it scales activations and weights; subclasses fix the side."""

    scales_input: ClassVar[bool]

    def __init__(self, base_layer: nn.Module, init: bool = True, where: str = "IA3 adapter") -> None:
        super().__init__()
        n_in, n_out = in_out_features(base_layer)
        features = n_in if self.scales_input else n_out
        self.where = where
        self.spatial = len(base_layer.kernel_size) if isinstance(base_layer, SUPPORTED_CONVS) else 0
        self.groups = getattr(base_layer, "groups", 1) if self.spatial else 1
        self.hf_conv1d = is_hf_conv1d(base_layer)
        if self.spatial:
            shape: tuple[int, ...] = (1, features) + (1,) * self.spatial
        else:
            shape = (1, features) if self.scales_input else (features, 1)
        self.ia3_l = nn.Parameter(torch.empty(shape))
        self.reset(init)

    @torch.no_grad()
    def reset(self, init: bool = True) -> None:
        """Ones (the adapter starts as the identity), or standard-normal entries if ``init`` is False."""
        if init:
            nn.init.ones_(self.ia3_l)
        else:
            nn.init.normal_(self.ia3_l)

    def vector(self) -> torch.Tensor:
        return self.ia3_l.reshape(-1)

    # -- forward --------------------------------------------------------------------------
    def _scale(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` scaled along its feature (linear) or channel (conv) dimension, in ``t``'s dtype."""
        scale = self.vector().reshape((-1,) + (1,) * self.spatial)
        return (t * scale).to(t.dtype)

    # -- merging --------------------------------------------------------------------------
    def _weight_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """``l`` shaped to multiply ``weight`` elementwise (rows for output, columns for input)."""
        vec = self.vector()
        if not self.scales_input:
            if self.hf_conv1d:  # (in, out) storage
                return vec.reshape(1, -1)
            return vec.reshape((-1,) + (1,) * (weight.dim() - 1))
        if self.hf_conv1d:
            return vec.reshape(-1, 1)
        if not self.spatial:
            return vec.reshape(1, -1)
        # conv weight (out, in/groups, *k): output channel o sees inputs of its group only
        out_channels, per_group = weight.shape[0], weight.shape[1]
        grouped = vec.reshape(self.groups, 1, per_group).expand(self.groups, out_channels // self.groups, per_group)
        return grouped.reshape((out_channels, per_group) + (1,) * self.spatial)

    @torch.no_grad()
    def _rescale(self, base_layer: nn.Module, divide: bool) -> None:
        """Multiply (or divide) the weight, and for output scaling the bias, by ``l``; all or nothing."""
        weight = base_layer.weight
        compute = torch.promote_types(weight.dtype, torch.float32)
        scale = self._weight_scale(weight).to(compute)
        new_weight = weight.to(compute) / scale if divide else weight.to(compute) * scale
        bias = getattr(base_layer, "bias", None)
        new_bias = None
        if bias is not None and not self.scales_input:
            vec = self.vector().to(compute)
            new_bias = bias.to(compute) / vec if divide else bias.to(compute) * vec
        if divide:
            for value in (new_weight, new_bias):
                if value is not None and not torch.isfinite(value).all():
                    raise MergeError(f"{self.where}: unmerging gives non-finite weights; the weights are unchanged")
        weight.copy_(new_weight.to(weight.dtype))
        if new_bias is not None:
            bias.copy_(new_bias.to(bias.dtype))

    def _near_zero(self, dtype: torch.dtype) -> tuple[int, float, float]:
        tol = unmerge_tolerance(dtype)
        magnitude = self.vector().detach().abs()
        return int((magnitude <= tol).sum()), tol, float(magnitude.min())

    def merge(self, base_layer: nn.Module) -> None:
        count, tol, smallest = self._near_zero(base_layer.weight.dtype)
        if count:
            warnings.warn(
                f"{self.where}: {count} entries of ia3_l are within {tol:g} of zero (smallest |l| = {smallest:g});"
                " merged, this adapter cannot be unmerged",
                GraftingWarning,
                stacklevel=2,
            )
        self._rescale(base_layer, divide=False)

    def unmerge(self, base_layer: nn.Module) -> None:
        count, tol, smallest = self._near_zero(base_layer.weight.dtype)
        if count:
            raise MergeError(
                f"{self.where}: cannot unmerge: {count} entries of ia3_l are within {tol:g} of zero "
                f"(smallest |l| = {smallest:g}), so the weights they scaled cannot be recovered; "
                "the weights are unchanged (reload the base model to get the original weights back)"
            )
        self._rescale(base_layer, divide=True)


class IA3Output(IA3Adapter, OutputAdapter):
    """``y -> l ⊙ y``: scales the layer's output, bias included."""

    scales_input = False

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self._scale(y)


class IA3Input(IA3Adapter, InputAdapter):
    """``x -> l ⊙ x``: the base layer sees its input scaled per input feature (channel)."""

    scales_input = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._scale(x)
