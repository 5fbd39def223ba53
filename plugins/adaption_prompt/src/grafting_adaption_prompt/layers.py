"""The adaption prompt adapter: gated attention of the layer's queries over learned prompt tokens."""

from __future__ import annotations

import torch
from torch import nn

from grafting import DeltaAdapter, LayerCall
from grafting_adaption_prompt.attention import AttentionKind


class AdaptionPrompt(DeltaAdapter):
    """``delta = out(gate · softmax(q Kₚᵀ · scale) Vₚ)`` on an attention module.

    ``adaption_prompt`` (1, adapter_len, hidden) holds the prompt tokens; the
    attention's own projections turn them into keys and values ``Kₚ, Vₚ``
    and the layer's input into queries ``q``. ``adaption_gate`` starts at
    zero, so a fresh adapter leaves the model as it was. The prompt attends
    to no mask: every position sees every prompt token. It cannot be
    merged into weights.
    """

    mergeable = False

    def __init__(self, kind: AttentionKind, adapter_len: int, hidden_size: int) -> None:
        super().__init__()
        self.kind = kind
        self.adaption_prompt = nn.Parameter(torch.randn(1, adapter_len, hidden_size))
        self.adaption_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        attention = call.base_layer
        batch, tokens = x.shape[:2]
        q = self.kind.queries(attention, x, call)
        k, v = self.kind.prompt_keys_values(attention, self.adaption_prompt.to(x.dtype))
        groups = q.shape[1] // k.shape[1]  # grouped-query attention: each key/value head serves `groups` queries
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2).to(q.dtype)) * self.kind.scale(attention)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) * self.adaption_gate.to(q.dtype)
        attended = torch.matmul(weights, v.to(q.dtype)).transpose(1, 2).reshape(batch, tokens, -1)
        return self.kind.output(attention, attended.to(x.dtype)).to(call.base_out.dtype)

    def extra_repr(self) -> str:
        return f"adapter_len={self.adaption_prompt.shape[1]}, attention={type(self.kind).__name__}"
