"""LoHa adapters for linear and convolution layers.

Parameters carry PEFT's on-disk names and shapes: ``hada_w1_a`` (out, r),
``hada_w1_b`` (r, in·k), ``hada_w2_a``, ``hada_w2_b``; with the effective
convolution, ``hada_w1_a`` (r, out), ``hada_w1_b`` (r, in) and the cores
``hada_t1``/``hada_t2`` (r, r, *kernel), a 1-d kernel stored as (k, 1).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from grafting import ConfigError, LayerCall
from grafting.toolkit import PRECISIONS, Precision, WeightDeltaAdapter, compute_dtype, convolve_as, in_out_features
from grafting_loha import hotswap
from grafting_loha.hadamard import dense_delta, factored_delta, factored_linear, prefer_factored

Path = Literal["auto", "dense", "factored"]
PATHS: tuple[str, ...] = ("auto", "dense", "factored")


def _kaiming(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class LoHaAdapter(WeightDeltaAdapter):
    """``delta = ΔW x`` with ``ΔW = (W1a·W1b) ⊙ (W2a·W2b) · alpha/r``, evaluated dense or factored.

    ``path`` picks the evaluation: ``"auto"`` (the cheaper one for this call's
    shape and number of positions), ``"dense"`` or ``"factored"``; all give
    the same values and gradients up to rounding. In training,
    ``module_dropout`` skips the adapter and ``rank_dropout`` zeroes output
    rows of ``ΔW``, the kept rows divided by the kept fraction.
    """

    lora_convertible = True  # an additive ΔW, as PEFT says for LoHa
    #: PEFT's LoHaLayer attributes (``layer.hada_w1_a["default"]``).
    peft_attributes = (
        "hada_w1_a",
        "hada_w1_b",
        "hada_w2_a",
        "hada_w2_b",
        "hada_t1",
        "hada_t2",
        "r",
        "scaling",
        "rank_dropout",
        "module_dropout",
    )

    #: Set per instance (or on the class) to force an evaluation; tests and benchmarks do.
    path: Path = "auto"
    #: For a bf16/fp16 input and float32 factors (outside autocast): ``"input"`` runs the
    #: products in the input's dtype, the factors cast down, as autocast would; ``"adapter"``
    #: casts the input up and runs them in float32, as PEFT does. The factors, their
    #: gradients and the optimizer state stay float32 either way.
    precision: Precision = "input"

    def __setattr__(self, name: str, value: object) -> None:
        """``path`` and ``precision`` are checked when set, not at the next forward."""
        allowed = {"path": PATHS, "precision": PRECISIONS}.get(name)
        if allowed is not None and value not in allowed:
            raise ConfigError(f"{type(self).__name__}.{name} must be one of {list(allowed)}, got {value!r}")
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
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        self.r, self.scaling = r, scaling
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        self.n_out, self.effective = n_out, effective
        if effective:
            core = (*kernel, 1) if len(kernel) == 1 else kernel
            self.hada_w1_a = nn.Parameter(torch.empty(r, n_out))
            self.hada_w1_b = nn.Parameter(torch.empty(r, n_in))
            self.hada_w2_a = nn.Parameter(torch.empty(r, n_out))
            self.hada_w2_b = nn.Parameter(torch.empty(r, n_in))
            self.hada_t1 = nn.Parameter(torch.empty(r, r, *core))
            self.hada_t2 = nn.Parameter(torch.empty(r, r, *core))
        else:
            n_flat = n_in * math.prod(kernel)
            self.hada_w1_a = nn.Parameter(torch.empty(n_out, r))
            self.hada_w1_b = nn.Parameter(torch.empty(r, n_flat))
            self.hada_w2_a = nn.Parameter(torch.empty(n_out, r))
            self.hada_w2_b = nn.Parameter(torch.empty(r, n_flat))
        self.reset_parameters(init_weights)

    @torch.no_grad()
    def reset_parameters(self, init_weights: bool = True) -> None:
        """Kaiming-uniform factors; with ``init_weights`` ``hada_w2_b`` is zero, so ΔW starts at 0.

        Drawn in PEFT's order from torch's generator (the zero factor draws nothing), so a seeded
        script builds the same adapter as with PEFT.
        """
        for p in self.parameters():
            if not (init_weights and p is self.hada_w2_b):
                _kaiming(p)
        if init_weights:
            nn.init.zeros_(self.hada_w2_b)

    # -- the product ------------------------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(L1, R1, L2, R2)`` with ``ΔW = (L1·R1) ⊙ (L2·R2) · scaling`` as an (out, in·k) matrix."""
        if not self.effective:
            return self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b
        r = self.r
        right1 = torch.einsum("ij...,jc->ic...", self.hada_t1, self.hada_w1_b).reshape(r, -1)
        right2 = torch.einsum("ij...,jc->ic...", self.hada_t2, self.hada_w2_b).reshape(r, -1)
        return self.hada_w1_a.T, right1, self.hada_w2_a.T, right2

    def delta_matrix(self) -> torch.Tensor:
        """``ΔW`` as an (out, in·k) matrix (no dropout)."""
        return dense_delta(*self.factors(), self.scaling)

    def _row_scale(self) -> torch.Tensor | float:
        """``scaling``, times PEFT's rank-dropout row mask (drawn on the CPU, as PEFT does) in training."""
        if not (self.training and self.rank_dropout):
            return self.scaling
        keep = (torch.rand(self.n_out) > self.rank_dropout).to(self.hada_w1_a.dtype)
        mean = keep.mean()
        keep = keep / mean if mean > 0 else keep
        return (keep * self.scaling).to(self.hada_w1_a.device)

    def _skipped(self) -> bool:
        """Module dropout: one draw from the CPU generator per training call, where and as PEFT draws it
        (also at ``module_dropout = 0``), so the same seed drops the same modules and rows and a seeded
        script's later draws stay in step; under ``torch.compile`` only when a dropout is on."""
        if not self.training:
            return False
        if not (self.module_dropout or self.rank_dropout) and torch.compiler.is_compiling():
            return False
        return float(torch.rand(1)) <= self.module_dropout

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the products run in: the toolkit's policy (:func:`grafting.toolkit.compute_dtype`)."""
        return compute_dtype(self.precision, self.hada_w1_a.dtype, x, where=type(self).__name__)

    def _use_factored(self, n_flat: int, positions: int, allowed: bool = True) -> bool:
        if not allowed or self.path == "dense":
            return False
        return self.path == "factored" or prefer_factored(self.n_out, n_flat, self.r, positions)

    # -- hot-swapping (grafting_loha.hotswap) -------------------------------------------
    def pad_rank(self, rank: int) -> None:
        hotswap.pad(self, rank)

    def hotswap_values(self, tensors: dict[str, torch.Tensor], config: Any, module_name: str) -> dict[str, Any]:
        return hotswap.swap_values(self, tensors, config, module_name)

    def hotswap_blank_values(self, base_layer: nn.Module) -> dict[str, torch.Tensor]:
        return hotswap.blank_values(self)


def _zero_delta(call: LayerCall) -> torch.Tensor:
    return torch.zeros((), dtype=call.base_out.dtype, device=call.base_out.device)


class LoHaLinear(LoHaAdapter):
    """LoHa on ``nn.Linear``."""

    def __init__(self, base_layer: nn.Linear, r: int, scaling: float, **options: float | bool) -> None:
        n_in, n_out = in_out_features(base_layer)
        super().__init__(n_out, n_in, r, scaling, **options)  # type: ignore[arg-type]
        self.n_in = n_in

    def forward(self, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        if self._skipped():
            return _zero_delta(call)
        dtype = self._compute_dtype(x)
        row_scale = self._row_scale()
        if self._use_factored(self.n_in, x.numel() // self.n_in):
            out = factored_linear(x, *self.factors(), row_scale, dtype)
        else:
            out = F.linear(x.to(dtype), dense_delta(*self.factors(), row_scale).to(dtype))
        return out.to(call.base_out.dtype)


class LoHaConv(LoHaAdapter):
    """LoHa on ``nn.Conv1d``/``nn.Conv2d``, optionally with the effective factorization (r×r kernel cores).

    The delta convolves with the base layer's own stride, padding, dilation,
    groups and padding mode. Factored: a convolution with the r² kernels of
    ``V``, then a pointwise one with ``U`` (groups of 1 only).
    """

    def __init__(
        self,
        base_layer: nn.Conv1d | nn.Conv2d,
        r: int,
        scaling: float,
        effective: bool = False,
        **options: float | bool,
    ) -> None:
        kernel = tuple(base_layer.kernel_size)
        effective = effective and math.prod(kernel) > 1
        n_in = base_layer.in_channels // base_layer.groups
        super().__init__(base_layer.out_channels, n_in, r, scaling, kernel=kernel, effective=effective, **options)  # type: ignore[arg-type]
        self.n_flat = n_in * math.prod(kernel)
        self.kernel = kernel

    def forward(self, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        if self._skipped():
            return _zero_delta(call)
        base = call.base_layer
        dtype = self._compute_dtype(x)
        h = x.to(dtype)
        row_scale = self._row_scale()
        positions = call.base_out.numel() // self.n_out
        if self._use_factored(self.n_flat, positions, allowed=base.groups == 1):
            u, v = factored_delta(*self.factors(), row_scale)
            kernels = v.to(dtype).reshape(-1, self.n_flat // math.prod(self.kernel), *self.kernel)
            mid = convolve_as(base, h, kernels)
            pointwise = F.conv1d if len(self.kernel) == 1 else F.conv2d
            out = pointwise(mid, u.to(dtype).reshape(*u.shape, *(1,) * len(self.kernel)))
        else:
            weight = dense_delta(*self.factors(), row_scale).to(dtype)
            out = convolve_as(base, h, weight.reshape(self.n_out, -1, *self.kernel))
        return out.to(call.base_out.dtype)
