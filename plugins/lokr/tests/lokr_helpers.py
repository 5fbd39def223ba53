"""Shared pieces of the LoKr plugin's tests: a convolutional model, seeded factors, comparisons."""

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
#: float64 models against float64 formulas: rounding stays near 1e-15, a wrong delta is far above this
TOL = {"rtol": 1e-10, "atol": 1e-10}
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "bert": ["query", "key", "value", "dense"],
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "gpt2": ["lm_head"],  # GPT-2's blocks are transformers' Conv1D, which LoKr (PEFT's too) does not adapt
    "conv": ["conv_a", "conv_b", "grouped", "conv_c", "seq", "seq_pw"],
}


class ConvNet(nn.Module):
    """Every convolution LoKr handles: 3×3 padded, 1×1, grouped, strided dilated non-square, Conv1d k=3 and k=1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv_c = nn.Conv2d(8, 6, (3, 2), stride=2, padding=(1, 0), dilation=(1, 2))
        self.seq = nn.Conv1d(6, 4, 3, padding=1)
        self.seq_pw = nn.Conv1d(4, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        h = torch.tanh(self.conv_a(pixel_values))
        h = torch.tanh(self.grouped(self.conv_b(h)))
        h = torch.tanh(self.conv_c(h)).flatten(2)
        h = torch.tanh(self.seq_pw(self.seq(h)))
        return SimpleNamespace(logits=self.head(h.mean(-1)))


def base(arch: str, seed: int = 0) -> nn.Module:
    """A float64 tiny model: one of grafting.testing's architectures, or ``conv``."""
    if arch == "conv":
        torch.manual_seed(seed)
        return ConvNet().to(F64).eval()
    model = tiny_model(arch, seed=seed).to(F64)
    if arch == "gpt2":  # its one linear layer, the head, gets a weight of its own: a merge then changes it alone
        model.config.tie_word_embeddings = False
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    return model


def inputs(arch: str, seed: int = 0, batch: int = 2) -> dict[str, Any]:
    return pixel_inputs(batch, seed=seed) if arch == "conv" else sample_inputs(arch, batch=batch, length=5, seed=seed)


def output(model: nn.Module, arch: str, seed: int = 0) -> torch.Tensor:
    return model_output(model, inputs(arch, seed))


def train_output(model: nn.Module, arch: str, seed: int = 0) -> torch.Tensor:
    """A differentiable scalar of the model's output."""
    return logits_loss(model, inputs(arch, seed))


def lokr_params(model: nn.Module, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """Every LoKr parameter of a grafting or PEFT model (of one grafting adapter if given), by name."""
    return parameters_named(model, ".lokr_", adapter_name=adapter)


@torch.no_grad()
def randomize(model: nn.Module, seed: int, adapter: str | None = None, scale: float = 0.3) -> None:
    """Give every LoKr factor seeded values of order ``scale`` (none zero, so every factor matters)."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(lokr_params(model, adapter).items()):
        p.copy_((torch.randn(p.shape, generator=gen, dtype=F64) * scale).to(p.dtype))
