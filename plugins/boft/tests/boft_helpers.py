"""Shared pieces of the BOFT plugin's tests: float64 tiny models, a convolutional net, seeded adapters,
and PEFT's butterflies on a CPU (its block-diagonal CUDA extension replaced by torch.block_diag)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from grafting.testing import float64_inputs, float64_model, output_loss, parameters_named, run_output
from grafting.testing import peft_parameter_name as peft_key
from grafting.testing import state_copy as weights_of
from grafting.testing import untied_tiny_gpt2 as untied_gpt2

__all__ = ["peft_key", "untied_gpt2", "weights_of"]

F64 = torch.float64
#: per architecture: the layers BOFT adapts there (GPT-2: lm_head, its one nn.Linear; PEFT refuses Conv1D)
TARGETS = {
    "llama": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    "gpt2": ["lm_head"],
    "bert": ["query", "value", "dense"],
    "t5": ["q", "v", "wo", "wi"],
    "conv": ["pointwise", "spatial"],
}


class _BlockDiagonal:
    """What PEFT's FastBlockDiag asks of its CUDA extension: (N, D, H, H) -> (N, D·H, D·H) and back."""

    @staticmethod
    def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]

    @staticmethod
    def backward(grad: torch.Tensor, blocks: torch.Tensor) -> list[torch.Tensor]:
        size = blocks.shape[-1]
        diagonal = [grad[:, i * size : (i + 1) * size, i * size : (i + 1) * size] for i in range(blocks.shape[1])]
        return [torch.stack(diagonal, dim=1)]


def use_peft_butterflies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without its CUDA extension PEFT drops every butterfly factor but the first (it warns and uses 1);
    with this block-diagonal stand-in it computes its full butterfly product on the CPU."""
    import peft.tuners.boft.layer as layer

    monkeypatch.setattr(layer, "_FBD_CUDA", _BlockDiagonal)


class ConvNet(nn.Module):
    """Conv2d layers BOFT adapts: 1×1 (4 inputs) and 3×3 padded (54 inputs); a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.pointwise = nn.Conv2d(4, 6, 1)
        self.spatial = nn.Conv2d(6, 5, 3, padding=1)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.spatial(torch.tanh(self.pointwise(x))))
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


def boft_params(model: nn.Module, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """Every BOFT parameter of a grafting or PEFT model (of one grafting adapter if given), by name."""
    return parameters_named(model, "boft_R", "boft_s", adapter_name=adapter)


@torch.no_grad()
def randomize(model: nn.Module, seed: int, adapter: str | None = None) -> None:
    """Seeded values far from a fresh adapter's: rotations of order 0.3, scales 1 ± 0.3."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(boft_params(model, adapter).items()):
        noise = torch.randn(p.shape, generator=gen, dtype=F64) * 0.3
        p.copy_((noise + (1.0 if "boft_s" in name else 0.0)).to(p.dtype))
