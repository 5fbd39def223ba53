"""Shared helpers for the IA3 plugin's tests."""

from __future__ import annotations

import torch
from torch import nn

from grafting.model.layer import AdaptedLayer


def ia3_parameters(model: nn.Module, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """Every ``ia3_l`` of ``model`` (of one adapter if given), by name."""
    return {
        name: p
        for name, p in model.named_parameters()
        if name.endswith("ia3_l") and (adapter is None or f".adapters.{adapter}." in name)
    }


@torch.no_grad()
def randomize(model: nn.Module, seed: int, adapter: str | None = None, low: float = 0.5, high: float = 1.5) -> None:
    """Give every ``ia3_l`` random entries with |l| in [low, high) and random signs."""
    gen = torch.Generator().manual_seed(seed)
    for p in ia3_parameters(model, adapter).values():
        magnitude = low + (high - low) * torch.rand(p.shape, generator=gen)
        sign = torch.where(torch.rand(p.shape, generator=gen) < 0.2, -1.0, 1.0)
        p.copy_(magnitude * sign)


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the base model's tensors, keyed by their path in the plain model."""
    out = {}
    for name, tensor in model.state_dict().items():
        if ".adapters." in name or "ia3_l" in name or "lora_" in name:
            continue
        out[name.replace(".base_layer.", ".")] = tensor.detach().clone()
    return out


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdaptedLayer)}


class Holder(nn.Module):
    """A model of one layer named ``layer``, to target it alone."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)
