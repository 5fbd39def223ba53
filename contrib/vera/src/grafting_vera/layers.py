"""VeRA's shared projections and its layer adapter."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from grafting import LayerCall, SharedState
from grafting.toolkit import WeightDeltaAdapter, in_out_features
from grafting_vera import hotswap


def kaiming_uniform(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    """A (rows, columns) matrix, uniform in ±gain·√3/√fan_in with gain √2 (fan_in = columns), drawn from ``generator``.

    The bound is computed in PEFT's order of operations, so the same seed
    gives the same bits as PEFT's projections.
    """
    std = math.sqrt(2.0) / math.sqrt(columns)
    bound = math.sqrt(3.0) * std
    matrix = torch.empty(rows, columns, device="cpu")  # explicit: drawn for real even while loading (meta)
    return matrix.uniform_(-bound, bound, generator=generator)


def draw_projections(r: int, n_in: int, n_out: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` (r, n_in) then ``B`` (n_out, r), drawn from a CPU generator seeded with ``key``."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    return kaiming_uniform(r, n_in, generator), kaiming_uniform(n_out, r, generator)


class VeraProjections(SharedState):
    """The frozen random ``vera_A`` (r × largest in) and ``vera_B`` (largest out × r) of one adapter.

    Drawn from a CPU ``torch.Generator`` seeded with ``key``: ``A`` first, then
    ``B``. Saved (``base_model.vera_A``/``vera_B``) only when ``save``; else
    they are non-persistent buffers, drawn again from the key when loading.
    """

    def __init__(self, r: int, n_in: int, n_out: int, key: int, save: bool) -> None:
        super().__init__()
        vera_a, vera_b = draw_projections(r, n_in, n_out, key)
        self.register_buffer("vera_A", vera_a, persistent=save)
        self.register_buffer("vera_B", vera_b, persistent=save)

    def pad_rank(self, rank: int) -> None:
        """Zeros up to ``rank`` (:mod:`grafting_vera.hotswap`)."""
        hotswap.pad_shared(self, rank)

    def hotswap_values(self, tensors: dict[str, torch.Tensor], config: Any) -> dict[str, Any]:
        """A saved VeRA adapter's projections in these buffers' shapes (:mod:`grafting_vera.hotswap`)."""
        return hotswap.swap_shared(self, tensors, config, draw_projections)


class VeraLinear(WeightDeltaAdapter):
    """``delta = λ_b ⊙ B[:out] (λ_d ⊙ A[:, :in] dropout(x))`` for ``nn.Linear`` and ``Conv1D``."""

    peft_attributes = ("vera_lambda_b", "vera_lambda_d", "vera_dropout")  # PEFT's VeraLayer: layer.vera_lambda_b[...]

    def __init__(
        self,
        base_layer: nn.Module,
        shared: VeraProjections,
        dropout: float = 0.0,
        d_initial: float = 0.1,
        init: bool = True,
    ) -> None:
        super().__init__()
        self.n_in, self.n_out = in_out_features(base_layer)
        self.use_shared(shared)
        r = shared.vera_A.shape[0]
        self.vera_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.vera_lambda_b = nn.Parameter(torch.ones(self.n_out))
        self.vera_lambda_d = nn.Parameter(torch.randn(r))
        if init:  # the identity: λ_b = 0, λ_d = d_initial
            with torch.no_grad():
                self.vera_lambda_b.zero_()
                self.vera_lambda_d.fill_(d_initial)

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slices ``A[:, :in]`` and ``B[:out]`` of the shared projections, in the vectors' dtype."""
        shared = self.shared
        assert isinstance(shared, VeraProjections)
        dtype = self.vera_lambda_d.dtype
        return shared.vera_A[:, : self.n_in].to(dtype), shared.vera_B[: self.n_out].to(dtype)

    def delta_matrix(self) -> torch.Tensor:
        """``ΔW = diag(λ_b) B diag(λ_d) A`` as an (out, in) matrix."""
        a, b = self.projections()
        return (self.vera_lambda_b[:, None] * b) @ (self.vera_lambda_d[:, None] * a)

    def forward(self, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        a, b = self.projections()
        h = F.linear(self.vera_dropout(x.to(self.vera_lambda_d.dtype)), a)
        return self.vera_lambda_b * F.linear(self.vera_lambda_d * h, b)  # the adapter's dtype; rounded once

    def pad_rank(self, rank: int) -> None:
        hotswap.pad_layer(self, rank)

    def hotswap_values(self, tensors: dict[str, torch.Tensor], config: Any, module_name: str) -> dict[str, Any]:
        return hotswap.swap_layer(self, tensors, config)

    def hotswap_blank_values(self, base_layer: nn.Module) -> dict[str, torch.Tensor]:
        return hotswap.blank_layer(self)
