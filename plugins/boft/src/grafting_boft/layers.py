"""BOFT adapters for linear and 2-d convolution layers.

Parameters carry PEFT's on-disk names and shapes: ``boft_R`` (factors, blocks, b, b) and
``boft_s``, (out, 1) on a linear layer and (1, out) on a convolution. PEFT keeps its permutation
matrices as non-persistent buffers (not in its files); grafting needs none.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from grafting import DeltaAdapter, InputAdapter, LayerAdapter, LayerCall, MergeError
from grafting.toolkit import convolve_as, dense_weight, fit_state, require_same, store_weight
from grafting_boft.butterfly import cayley, dense, rotate


class BOFTAdapter(LayerAdapter):
    """What both layer types share: the trained factors, their rotations, dropout and merges."""

    def __init__(
        self, factors: int, blocks: int, size: int, n_out: int, *, conv: bool, dropout: float, init_weights: bool
    ) -> None:
        super().__init__()
        self.dropout = dropout
        self.boft_R = nn.Parameter(torch.zeros(factors, blocks, size, size))
        self.boft_s = nn.Parameter(torch.ones((1, n_out) if conv else (n_out, 1)))
        if not init_weights:
            with torch.no_grad():
                self.boft_R.normal_(0.0, 0.1)
                self.boft_s.normal_(1.0, 0.1)

    def factors(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (f, blocks, b, b) orthogonal blocks of every factor; in training, with PEFT's block dropout.

        The dropout draws as PEFT's: one factor (``randint``), then which of its blocks become the
        identity (``randperm``), from the global CPU generator.
        """
        rotations = cayley(self.boft_R if dtype is None else self.boft_R.to(dtype))
        if self.training and self.dropout > 0:
            count, blocks, size = rotations.shape[:3]
            chosen = int(torch.randint(0, count, (1,)).item())
            dropped = torch.randperm(blocks) < int(self.dropout * blocks)
            mask = torch.zeros(count, blocks, 1, 1, dtype=torch.bool)
            mask[chosen, :, 0, 0] = dropped
            eye = torch.eye(size, dtype=rotations.dtype, device=rotations.device)
            rotations = torch.where(mask.to(rotations.device), eye, rotations)
        return rotations

    def matrix(self) -> torch.Tensor:
        """The whole (n, n) rotation ``M_{f-1} ··· M_0`` (reference path)."""
        return dense(self.factors())

    # -- hot-swapping: the butterfly's layout is no rank, so nothing pads --
    def pad_rank(self, rank: int) -> None:
        """Nothing to grow: BOFT's blocks and butterfly factors are not a rank."""

    def hotswap_values(self, tensors: dict[str, torch.Tensor], config: Any, module_name: str) -> dict[str, Any]:
        require_same("boft_dropout", float(config.boft_dropout), float(self.dropout))
        fixed = (
            "BOFT's layout (boft_block_size/boft_block_num, boft_n_butterfly_factor) is not a rank:"
            " a hot-swap cannot change it"
        )
        return fit_state(self, tensors, fixed=fixed)

    def hotswap_blank_values(self, base_layer: nn.Module) -> dict[str, torch.Tensor]:
        """``boft_R`` zero (its skew part zero: every butterfly factor is the identity) and the scale ``boft_s``
        ones. The convolution then runs with its own weight; the linear layer computes ``(y − b)·1 + b``, its
        base output up to the rounding of that subtraction and addition."""
        return {"boft_R": torch.zeros_like(self.boft_R.detach()), "boft_s": torch.ones_like(self.boft_s.detach())}

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The input's dtype (PEFT casts its rotation to it), or autocast's."""
        if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def scale(self, dtype: torch.dtype) -> torch.Tensor:
        return self.boft_s.reshape(-1).to(dtype)

    @torch.no_grad()
    def merge(self, base_layer: nn.Module) -> None:
        """``W' = diag(s) · W · (M_{f-1}···M_0)ᵀ`` in float32 (or wider), rounded once; the old weight is kept."""
        weight = dense_weight(base_layer)
        wide = torch.promote_types(weight.dtype, torch.float32)
        rotated = rotate(weight.to(wide), self.factors(wide), transpose=True) * self.scale(wide)[:, None]
        self.__dict__["replaced"] = weight.detach().clone()
        store_weight(base_layer, rotated)

    @torch.no_grad()
    def unmerge(self, base_layer: nn.Module) -> None:
        """The weight the merge replaced, bit for bit."""
        kept = self.__dict__.pop("replaced", None)
        if kept is None:
            raise MergeError(f"{type(self).__name__} was not merged into this {type(base_layer).__name__}")
        store_weight(base_layer, kept)


class BOFTLinear(BOFTAdapter, InputAdapter):
    """BOFT on ``nn.Linear``: the input rotated factor by factor, the base product's outputs scaled by ``s``.

    ``y = s ⊙ (W·x') + b`` with ``x' = x · M_{f-1}···M_0``: an input adapter whose :meth:`after_base`
    scales the product (not the bias), as PEFT computes it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype(x)
        return rotate(x.to(dtype), self.factors().to(dtype)).to(x.dtype)

    def after_base(self, y: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        bias = getattr(base_layer, "bias", None)
        scale = self.scale(torch.promote_types(y.dtype, self.boft_s.dtype))
        if bias is None:
            return (y * scale).to(y.dtype)
        return ((y - bias) * scale + bias).to(y.dtype)


class BOFTConv2d(BOFTAdapter, DeltaAdapter):
    """BOFT on ``nn.Conv2d``: the kernel's (in·k·k) rows rotated and scaled, the convolution run with it.

    Alone on its layer one convolution runs with ``W'`` (:meth:`fused_call`), as PEFT does; beside
    other adapters it adds ``conv(x, W' − W)``. Its merge reads the layer's own weight.
    """

    reads_base_weight = True

    def rotated_weight(self, base_layer: nn.Conv2d, dtype: torch.dtype) -> torch.Tensor:
        weight = base_layer.weight
        rotated = rotate(weight.flatten(1).to(dtype), self.factors().to(dtype), transpose=True)
        return (rotated * self.scale(dtype)[:, None]).reshape(weight.shape)

    def forward(self, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        base = call.base_layer
        dtype = self.compute_dtype(x)
        delta = self.rotated_weight(base, dtype) - base.weight.to(dtype)
        return convolve_as(base, x.to(dtype), delta, None)

    def fused_call(self, base_layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        if not isinstance(base_layer, nn.Conv2d) or base_layer._forward_hooks or base_layer._forward_pre_hooks:
            return None
        dtype = self.compute_dtype(x)
        bias = None if base_layer.bias is None else base_layer.bias.to(dtype)
        return convolve_as(base_layer, x.to(dtype), self.rotated_weight(base_layer, dtype), bias).to(x.dtype)
