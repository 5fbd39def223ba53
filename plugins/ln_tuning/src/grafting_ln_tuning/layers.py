"""The LN-tuning adapter: a trained copy of its layer, whose parameters replace the layer's own."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from grafting import WeightAdapter
from grafting.toolkit import fit_state


class LNTuningAdapter(WeightAdapter):
    """A copy of the base layer, ``ln_tuning_layers`` (PEFT's key), trained in place of it.

    A weight adapter: the layer runs with the copy's parameters in place of its own
    (``weight_deltas`` are ``W' − W``, so other adapters of the layer compose with it).
    Alone on a layer called with its input only, the copy itself computes the output, as
    in PEFT. Merging writes the copy's values into the layer and keeps the originals,
    which unmerging writes back: both exact.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.ln_tuning_layers = copy.deepcopy(base_layer)
        self._originals: dict[str, torch.Tensor] = {}

    def _pairs(self, base_layer: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
        """(name, the layer's parameter, the copy's), for every floating-point parameter."""
        own = dict(self.ln_tuning_layers.named_parameters())
        return [(name, p, own[name]) for name, p in base_layer.named_parameters() if p.is_floating_point()]

    def pad_rank(self, rank: int) -> None:
        """Nothing to grow: the copy has its layer's shapes."""

    def hotswap_values(self, tensors: dict[str, torch.Tensor], config: Any, module_name: str) -> dict[str, Any]:
        """The saved copy's parameters, in place of this copy's (same layer, same shapes)."""
        return fit_state(self, tensors, fixed="LN tuning copies its layer")

    def hotswap_blank_values(self, base_layer: nn.Module) -> dict[str, torch.Tensor]:
        """The base layer's own parameters and buffers (a norm's weight and bias): the copy is then the layer."""
        base = base_layer.state_dict()
        prefix = "ln_tuning_layers."
        return {key: base[key.removeprefix(prefix)].detach().clone() for key in self.state_dict(keep_vars=True)}

    def weight_deltas(self, base_layer: nn.Module) -> dict[str, torch.Tensor]:
        return {name: trained.to(param.dtype) - param for name, param, trained in self._pairs(base_layer)}

    def fused_call(self, base_layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """The copy's own forward, when its parameters have the layer's dtypes (a float32 copy of a
        bfloat16 norm would change the output's dtype: the composition casts it instead)."""
        if any(trained.dtype != param.dtype for _, param, trained in self._pairs(base_layer)):
            return None
        return self.ln_tuning_layers(x)

    @torch.no_grad()
    def merge(self, base_layer: nn.Module) -> None:
        pairs = self._pairs(base_layer)
        self._originals = {name: param.detach().clone() for name, param, _ in pairs}
        for _, param, trained in pairs:
            param.copy_(trained)

    @torch.no_grad()
    def unmerge(self, base_layer: nn.Module) -> None:
        for name, param, _ in self._pairs(base_layer):
            param.copy_(self._originals[name])
        self._originals = {}
