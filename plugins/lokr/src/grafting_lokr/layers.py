"""LoKr adapters for linear and convolution layers.

Parameters carry PEFT's on-disk names and shapes. ``W1`` (a, b) is ``lokr_w1``
or the product ``lokr_w1_a`` (a, r) · ``lokr_w1_b`` (r, b); ``W2`` (c, d) is
``lokr_w2`` or ``lokr_w2_a`` (c, r) · ``lokr_w2_b`` (r, d); for a convolution
``W2`` carries the kernel: ``lokr_w2`` (c, d, *kernel), ``lokr_w2_b``
(r, d·kernel), or with the effective factorization ``lokr_w2_a`` (r, c),
``lokr_w2_b`` (r, d) and the core ``lokr_t2`` (r, r, *kernel), a 1-d kernel
stored as (k, 1).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from grafting import ConfigError, LayerCall
from grafting.toolkit import PRECISIONS, Precision, WeightDeltaAdapter, compute_dtype, convolve_as
from grafting_lokr import hotswap
from grafting_lokr.kron import kron_delta, kron_linear, split_size, tucker_kernel

Init = bool | Literal["lycoris"]


def _kaiming(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class LoKrAdapter(WeightDeltaAdapter):
    """``delta = ΔW x`` with ``ΔW = (W1 ⊗ W2) · alpha/r``.

    In training, ``module_dropout`` skips the adapter and ``rank_dropout``
    zeroes output rows of ``ΔW`` (the kept rows divided by their mean with
    ``rank_dropout_scale``), drawn as PEFT draws them.
    """

    #: For a bf16/fp16 input and float32 factors (outside autocast): ``"input"`` runs the products in
    #: the input's dtype, as autocast would; ``"adapter"`` casts the input up, as PEFT does.
    precision: Precision = "input"

    def __setattr__(self, name: str, value: object) -> None:
        if name == "precision" and value not in PRECISIONS:
            raise ConfigError(f"{type(self).__name__}.precision must be one of {list(PRECISIONS)}, got {value!r}")
        super().__setattr__(name, value)

    def __init__(
        self,
        n_out: int,
        n_in: int,
        r: int,
        scaling: float,
        *,
        kernel: tuple[int, ...] = (),
        effective: bool = False,
        decompose_both: bool = False,
        decompose_factor: int = -1,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        rank_dropout_scale: bool = False,
        init_weights: Init = True,
    ) -> None:
        super().__init__()
        self.r, self.scaling, self.n_out, self.kernel = r, scaling, n_out, kernel
        self.rank_dropout, self.module_dropout, self.rank_dropout_scale = (
            rank_dropout,
            module_dropout,
            rank_dropout_scale,
        )
        a, c = split_size(n_out, decompose_factor)
        b, d = split_size(n_in, decompose_factor)
        if decompose_both and r < max(a, b) / 2:
            self.lokr_w1_a = nn.Parameter(torch.empty(a, r))
            self.lokr_w1_b = nn.Parameter(torch.empty(r, b))
        else:
            self.lokr_w1 = nn.Parameter(torch.empty(a, b))
        core = (*kernel, 1) if len(kernel) == 1 else kernel
        self.effective = effective and r < max(c, d) / 2 and math.prod(kernel) > 1
        if r >= max(c, d) / 2:
            self.lokr_w2 = nn.Parameter(torch.empty(c, d, *kernel))
        elif self.effective:
            self.lokr_w2_a = nn.Parameter(torch.empty(r, c))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, d))
            self.lokr_t2 = nn.Parameter(torch.empty(r, r, *core))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(c, r))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, d * math.prod(kernel)))
        self.reset_parameters(init_weights)

    @torch.no_grad()
    def reset_parameters(self, init_weights: Init = True) -> None:
        """Kaiming-uniform factors; ``True`` zeroes W1 (``lokr_w1`` or ``lokr_w1_a``), ``"lycoris"`` W2
        (``lokr_w2`` or ``lokr_w2_b``): either way ΔW starts at 0. ``False`` leaves every factor random."""
        for p in self.parameters():
            _kaiming(p)
        if init_weights is False:
            return
        for name in ("lokr_w1", "lokr_w1_a") if init_weights is True else ("lokr_w2", "lokr_w2_b"):
            if hasattr(self, name):
                nn.init.zeros_(getattr(self, name))

    # -- the product ------------------------------------------------------------------
    def w1(self) -> torch.Tensor:
        """``W1`` (a, b)."""
        if hasattr(self, "lokr_w1"):
            return self.lokr_w1
        return self.lokr_w1_a @ self.lokr_w1_b

    def w2(self) -> torch.Tensor:
        """``W2``: (c, d) for a linear layer; with its kernel for a convolution, as PEFT shapes it."""
        if hasattr(self, "lokr_w2"):
            return self.lokr_w2
        if self.effective:
            return tucker_kernel(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        return self.lokr_w2_a @ self.lokr_w2_b

    def delta_matrix(self) -> torch.Tensor:
        """``ΔW`` as an (out, in·k) matrix (no dropout)."""
        return kron_delta(self.w1(), self.w2(), self.scaling)

    def _row_scale(self) -> torch.Tensor | float:
        """``scaling``, times PEFT's rank-dropout row mask (drawn on the CPU, as PEFT does) in training."""
        if not (self.training and self.rank_dropout):
            return self.scaling
        keep = (torch.rand(self.n_out) > self.rank_dropout).float()
        if self.rank_dropout_scale:
            mean = keep.mean()
            keep = keep / mean if mean > 0 else keep
        own = next(self.parameters())
        return keep.to(own.device, own.dtype) * self.scaling

    def _skipped(self) -> bool:
        """Module dropout: with either dropout on, one draw from the CPU generator per training call,
        where and as PEFT draws it, so the same seed drops the same modules and rows."""
        if not (self.training and (self.module_dropout or self.rank_dropout)):
            return False
        return float(torch.rand(1)) <= self.module_dropout

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the products run in: the toolkit's policy (:func:`grafting.toolkit.compute_dtype`)."""
        return compute_dtype(self.precision, next(self.parameters()).dtype, x, where=type(self).__name__)

    # -- hot-swapping (grafting_lokr.hotswap) -------------------------------------------
    def pad_rank(self, rank: int) -> None:
        hotswap.pad(self, rank)

    def hotswap_values(self, tensors: dict[str, torch.Tensor], config: Any, module_name: str) -> dict[str, Any]:
        return hotswap.swap_values(self, tensors, config, module_name)

    def hotswap_blank_values(self, base_layer: nn.Module) -> dict[str, torch.Tensor]:
        return hotswap.blank_values(self)


def _zero_delta(call: LayerCall) -> torch.Tensor:
    return torch.zeros((), dtype=call.base_out.dtype, device=call.base_out.device)


class LoKrLinear(LoKrAdapter):
    """LoKr on ``nn.Linear``: ``(W1 ⊗ W2)·x`` as two small products, never forming ΔW.

    ``factored = False`` (on an instance or the class) takes PEFT's recipe instead, ΔW
    formed and applied: the reference path the tests compare values and gradients with.
    """

    lora_convertible = True  # an additive ΔW, as PEFT says for LoKr's linear layer
    factored: bool = True

    def __init__(self, base_layer: nn.Linear, r: int, scaling: float, **options: object) -> None:
        super().__init__(base_layer.out_features, base_layer.in_features, r, scaling, **options)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        if self._skipped():
            return _zero_delta(call)
        dtype = self._compute_dtype(x)
        rows = self._row_scale()
        h = x.to(dtype)
        if not self.factored:
            return torch.nn.functional.linear(h, kron_delta(self.w1(), self.w2(), rows).to(dtype))
        if isinstance(rows, torch.Tensor):
            return kron_linear(h, self.w1().to(dtype), self.w2().to(dtype)) * rows.to(dtype)
        return kron_linear(h, (self.w1() * rows).to(dtype), self.w2().to(dtype))


class LoKrConv(LoKrAdapter):
    """LoKr on ``nn.Conv1d``/``nn.Conv2d``: ΔW (the size of the kernel) convolved with the base layer's
    own stride, padding, dilation, groups and padding mode; optionally the effective factorization."""

    def __init__(self, base_layer: nn.Conv1d | nn.Conv2d, r: int, scaling: float, **options: object) -> None:
        n_in = base_layer.in_channels // base_layer.groups
        kernel = tuple(base_layer.kernel_size)
        super().__init__(base_layer.out_channels, n_in, r, scaling, kernel=kernel, **options)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        if self._skipped():
            return _zero_delta(call)
        base = call.base_layer
        dtype = self._compute_dtype(x)
        weight = kron_delta(self.w1(), self.w2(), self._row_scale()).to(dtype)
        return convolve_as(base, x.to(dtype), weight.reshape(base.weight.shape))
