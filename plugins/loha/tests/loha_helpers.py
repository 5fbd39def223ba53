"""Shared pieces of the LoHa plugin's tests: a convolutional model, seeded adapters, comparisons."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from grafting.testing import float64_inputs, float64_model, output_loss, parameters_named, run_output
from grafting.testing import state_copy as weights_of

__all__ = ["weights_of"]

F64 = torch.float64
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_LINEAR = ["query", "key", "value", "dense"]
CONV_TARGETS = ["conv_a", "conv_b", "conv_c", "grouped", "seq", "seq_pw"]


class ConvNet(nn.Module):
    """Every convolution LoHa handles: 3×3 (padded), 1×1, strided non-square, grouped, and Conv1d k=3 / k=1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 6, 3, padding=1)
        self.conv_b = nn.Conv2d(6, 6, 1)
        self.grouped = nn.Conv2d(6, 6, 3, padding=1, groups=2)
        self.conv_c = nn.Conv2d(6, 4, (3, 2), stride=2, padding=(1, 0), dilation=(1, 2))
        self.seq = nn.Conv1d(4, 5, 3, padding=1)
        self.seq_pw = nn.Conv1d(5, 5, 1)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv_a(x))
        h = torch.tanh(self.grouped(self.conv_b(h)))
        h = torch.tanh(self.conv_c(h)).flatten(2)
        h = torch.tanh(self.seq_pw(self.seq(h)))
        return self.head(h.mean(-1))


def base(arch: str, seed: int = 0) -> nn.Module:
    """A float64 tiny model: ``llama``, ``bert`` or ``conv``."""
    return float64_model(arch, seed, ConvNet)


def inputs(arch: str, seed: int = 0) -> Any:
    return float64_inputs(arch, seed)


def output(model: nn.Module, arch: str, seed: int = 0) -> torch.Tensor:
    return run_output(model, inputs(arch, seed))


def train_output(model: nn.Module, arch: str, seed: int = 0) -> torch.Tensor:
    """A differentiable scalar of the model's output."""
    return output_loss(model, inputs(arch, seed))


def targets(arch: str) -> list[str]:
    return {"llama": LLAMA_LINEAR, "bert": BERT_LINEAR, "conv": CONV_TARGETS}[arch]


def hada_params(model: nn.Module, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """Every LoHa parameter of a grafting or PEFT model (of one grafting adapter if given), by name."""
    return parameters_named(model, "hada_", adapter_name=adapter)


@torch.no_grad()
def randomize(model: nn.Module, seed: int, adapter: str | None = None, scale: float = 0.3) -> None:
    """Give every LoHa factor seeded values of order ``scale`` (none zero, so every path matters)."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(hada_params(model, adapter).items()):
        p.copy_((torch.randn(p.shape, generator=gen, dtype=F64) * scale).to(p.dtype))


def deepcopy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module)
