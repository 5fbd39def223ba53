"""The modules that produce the virtual tokens: ``encoder() -> (tokens, width)``.

A :class:`PromptTable` holds the tokens themselves; the other encoders
compute them from a table with a trained network (P-tuning's MLP or LSTM,
prefix tuning's projection). PEFT's format saves only the result, so an
adapter loaded from disk always holds a :class:`PromptTable`.
"""

from __future__ import annotations

import torch
from torch import nn


class PromptTable(nn.Module):
    """Learned rows used as they are."""

    def __init__(self, rows: int, width: int, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(rows, width, _weight=weight)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight

    @classmethod
    def holding(cls, value: torch.Tensor, *, like: nn.Parameter, device: torch.device) -> PromptTable:
        """A table of ``value``, with ``like``'s dtype and trainability, on ``like``'s device (``device`` if meta)."""
        where = device if like.is_meta else like.device
        rows, width = value.shape
        table = cls(rows, width, weight=value.detach().to(device=where, dtype=like.dtype).clone())
        table.embedding.weight.requires_grad_(like.requires_grad)
        return table


class MLPPromptEncoder(nn.Module):
    """P-tuning's MLP: three linear layers with ReLU between them, width ``hidden``."""

    def __init__(self, rows: int, width: int, hidden: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(rows, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, width)
        )

    def forward(self) -> torch.Tensor:
        return self.mlp(self.embedding.weight)


class LSTMPromptEncoder(nn.Module):
    """P-tuning's LSTM: a bidirectional LSTM over the tokens, then two linear layers."""

    def __init__(self, rows: int, width: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(rows, width)
        self.lstm = nn.LSTM(
            width,
            hidden,
            num_layers=layers,
            dropout=dropout if layers > 1 else 0.0,
            bidirectional=True,
            batch_first=True,
        )
        self.mlp = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, width))

    def forward(self) -> torch.Tensor:
        states, _ = self.lstm(self.embedding.weight.unsqueeze(0))
        return self.mlp(states[0])


class PrefixProjection(nn.Module):
    """Prefix tuning's projection: ``width``-wide embeddings through Linear, tanh, Linear to ``out``."""

    def __init__(self, rows: int, width: int, hidden: int, out: int, zero: bool) -> None:
        super().__init__()
        self.embedding = nn.Embedding(rows, width)
        last = nn.Linear(hidden, out)
        if zero:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.transform = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), last)

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding.weight)
