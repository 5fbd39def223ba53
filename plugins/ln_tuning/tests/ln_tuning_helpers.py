"""Shared pieces of the LN-tuning plugin's tests: a convolutional model with norms, seeded copies."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from grafting.testing import logits_loss, model_output, parameters_named, pixel_inputs, sample_inputs, tiny_model
from grafting.testing import peft_parameter_name as peft_key
from grafting.testing import state_copy as weights_of

__all__ = ["peft_key", "weights_of"]

F64 = torch.float64
#: What each architecture tunes: PEFT's defaults where it has them (None), else the norms by name.
TARGETS: dict[str, list[str] | None] = {
    "llama": None,
    "gpt2": None,
    "t5": None,
    "bert": ["LayerNorm"],
    "conv": ["norm_a", "norm_b", "norm_c"],
}
#: Every target's name on each architecture, for drawing subsets.
NAMES = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "t5": ["layer_norm", "final_layer_norm"],
    "bert": ["LayerNorm"],
    "conv": ["norm_a", "norm_b", "norm_c"],
}


class ConvNet(nn.Module):
    """Convolutions with a GroupNorm, a BatchNorm-free LayerNorm over channels and an affine GroupNorm(1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1)
        self.norm_a = nn.GroupNorm(2, 8)
        self.conv_b = nn.Conv2d(8, 6, 3, stride=2)
        self.norm_b = nn.GroupNorm(1, 6)
        self.norm_c = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        h = torch.tanh(self.norm_a(self.conv_a(pixel_values)))
        h = torch.tanh(self.norm_b(self.conv_b(h))).mean((2, 3))
        return SimpleNamespace(logits=self.head(self.norm_c(h)))


def base(arch: str, seed: int = 0) -> nn.Module:
    """A float64 tiny model whose norms have random (not unit) parameters, so every copy matters."""
    torch.manual_seed(seed)
    model = ConvNet() if arch == "conv" else tiny_model(arch, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(n in name for n in NAMES[arch]):
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.to(F64).eval()


def inputs(arch: str, seed: int = 0, batch: int = 2) -> dict[str, Any]:
    return pixel_inputs(batch, seed=seed) if arch == "conv" else sample_inputs(arch, batch=batch, length=5, seed=seed)


def output(model: nn.Module, arch: str, seed: int = 0) -> torch.Tensor:
    return model_output(model, inputs(arch, seed))


def train_output(model: nn.Module, arch: str, seed: int = 0) -> torch.Tensor:
    return logits_loss(model, inputs(arch, seed))


def copies(model: nn.Module, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """Every parameter of an LN-tuning copy in a grafting or PEFT model (of one grafting adapter if given)."""
    return parameters_named(model, ".ln_tuning_layers.", adapter_name=adapter)


@torch.no_grad()
def randomize(model: nn.Module, seed: int, adapter: str | None = None, scale: float = 0.3) -> None:
    """Move every copied parameter by seeded noise of order ``scale``."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(copies(model, adapter).items()):
        p.add_((torch.randn(p.shape, generator=gen, dtype=F64) * scale).to(p.dtype))
