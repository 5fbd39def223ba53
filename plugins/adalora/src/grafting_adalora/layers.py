"""The AdaLoRA layer adapter: ``ΔW = B·(A ⊙ E) · scaling / ranknum`` on linear and 2-d convolution layers.

Parameters carry PEFT's on-disk names and shapes: ``lora_A`` (r, in·k), the singular
values ``lora_E`` (r, 1) and ``lora_B`` (out, r). ``ranknum`` (the rank the adapter
was created with, ``init_r``) is a buffer PEFT does not save.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from grafting import LayerCall
from grafting.toolkit import WeightDeltaAdapter, in_out_features
from grafting_adalora import hotswap


class AdaLoraAdapter(WeightDeltaAdapter):
    """``delta = ΔW x`` in SVD form; the rank allocator masks ``lora_E`` while training.

    ``scaling`` is ``lora_alpha`` (PEFT's AdaLoRA divides by ``ranknum + 1e-5``, not by ``r``).
    On a convolution the delta is a convolution with ``ΔW`` and the base layer's stride,
    padding and dilation.
    """

    lora_convertible = True  # an additive ΔW
    #: Grown by :meth:`pad_rank` for hot-swapping: its zero ranks are left out of the orthogonality term.
    rank_padded = False

    def __init__(
        self, base_layer: nn.Module, r: int, init_r: int, scaling: float, dropout: float, init_weights: bool
    ) -> None:
        super().__init__()
        n_in, n_out = in_out_features(base_layer)
        self.kernel: tuple[int, ...] = tuple(base_layer.kernel_size) if isinstance(base_layer, nn.Conv2d) else ()
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(r, n_in * math.prod(self.kernel)))
        self.lora_B = nn.Parameter(torch.empty(n_out, r))
        self.lora_E = nn.Parameter(torch.empty(r, 1))  # PEFT's parameter order: A, B, E
        # the rank the adapter started with: the scale stays lora_alpha / init_r after pruning (explicit
        # device: the file does not hold it, so it must not be left on the meta device when loading)
        self.register_buffer("ranknum", torch.full((1,), float(init_r), device="cpu"), persistent=False)
        self.reset_parameters(init_weights)

    @torch.no_grad()
    def reset_parameters(self, init_weights: bool = True) -> None:
        """``E = 0`` and small normal ``A``, ``B`` (a fresh adapter computes as the base); else all standard normal."""
        for p in (self.lora_A, self.lora_E, self.lora_B):
            nn.init.normal_(p)
        if init_weights:
            nn.init.zeros_(self.lora_E)
            nn.init.normal_(self.lora_A, std=0.02)
            nn.init.normal_(self.lora_B, std=0.02)

    @property
    def rank(self) -> int:
        return self.lora_E.shape[0]

    def scale(self) -> torch.Tensor:
        """``scaling / (ranknum + 1e-5)``, a one-element tensor in the adapter's dtype."""
        return self.scaling / (self.ranknum + 1e-5)

    def delta_matrix(self) -> torch.Tensor:
        """``ΔW`` as an (out, in·k) matrix."""
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scale()

    def forward(self, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        h = self.dropout(x.to(self.lora_A.dtype))
        if self.kernel:
            base = call.base_layer
            weight = self.delta_matrix().reshape(self.lora_B.shape[0], -1, *self.kernel)
            return F.conv2d(h, weight, None, base.stride, base.padding, base.dilation)
        # the scale folded into the r×in factor: no pass over the output for it (PEFT scales the output)
        return F.linear(F.linear(h, self.lora_A * (self.lora_E * self.scale())), self.lora_B)

    def pad_rank(self, rank: int) -> None:
        """Zeros up to ``rank`` (:mod:`grafting_adalora.hotswap`); the orthogonality term then skips them."""
        hotswap.pad(self, rank)
        self.rank_padded = True

    def hotswap_values(self, tensors: dict[str, torch.Tensor], config: Any, module_name: str) -> dict[str, Any]:
        """A saved AdaLoRA adapter's values in this one's shapes (:mod:`grafting_adalora.hotswap`)."""
        return hotswap.swap_values(self, tensors, config)

    def hotswap_blank_values(self, base_layer: nn.Module) -> dict[str, torch.Tensor]:
        """Zeros (:mod:`grafting_adalora.hotswap`)."""
        return hotswap.blank_values(self)
