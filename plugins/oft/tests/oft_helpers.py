"""Shared pieces of the OFT plugin's tests: float64 tiny models, a convolutional net, seeded adapters."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from grafting.testing import float64_inputs, float64_model, output_loss, parameters_named, run_output
from grafting.testing import peft_parameter_name as peft_key
from grafting.testing import state_copy as weights_of
from grafting.testing import untied_tiny_gpt2 as untied_gpt2

__all__ = ["peft_key", "untied_gpt2", "weights_of"]

F64 = torch.float64
#: per architecture: the layers OFT adapts there (GPT-2's linear layers are Conv1D, which PEFT's OFT refuses)
TARGETS = {
    "llama": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    "gpt2": ["wpe", "lm_head"],
    "bert": ["query", "value", "dense", "word_embeddings"],
    "t5": ["q", "v", "wo", "wi"],
    "conv": ["pointwise", "spatial", "strided"],
}
ARCHS = tuple(TARGETS)


class ConvNet(nn.Module):
    """Conv2d layers OFT adapts: 1×1, 3×3 padded, 3×3 strided with reflect padding; a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.pointwise = nn.Conv2d(4, 6, 1)
        self.spatial = nn.Conv2d(6, 6, 3, padding=1)
        self.strided = nn.Conv2d(6, 5, 3, stride=2, padding=1, padding_mode="reflect")
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.pointwise(x))
        h = torch.tanh(self.strided(torch.tanh(self.spatial(h))))
        return self.head(h.mean((2, 3)))


def base(arch: str, seed: int = 0) -> nn.Module:
    """A float64 tiny model: one of grafting.testing's, ``gpt2-untied`` or ``conv``."""
    return float64_model(arch, seed, ConvNet)


def inputs(arch: str, seed: int = 0) -> Any:
    return float64_inputs(arch, seed, pixels=(2, 4, 6, 6))


def output(model: nn.Module, arch: str, seed: int = 0) -> torch.Tensor:
    return run_output(model, inputs(arch, seed))


def loss(model: nn.Module, arch: str) -> torch.Tensor:
    """A differentiable scalar of the model's output."""
    return output_loss(model, inputs(arch))


def oft_params(model: nn.Module, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """Every OFT weight of a grafting or PEFT model (of one grafting adapter if given), by name."""
    return parameters_named(model, "oft_R", "oft_embedding_R", adapter_name=adapter)


@torch.no_grad()
def randomize(model: nn.Module, seed: int, adapter: str | None = None, scale: float = 0.3) -> None:
    """Seeded skew entries of order ``scale`` in every OFT weight: rotations far from the identity."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(oft_params(model, adapter).items()):
        p.copy_((torch.randn(p.shape, generator=gen, dtype=F64) * scale).to(p.dtype))
