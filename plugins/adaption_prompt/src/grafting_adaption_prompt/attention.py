"""How the adaption prompt reads each kind of attention module it supports.

An :class:`AttentionKind` knows where a module keeps its projections: it
gives the queries of the layer's input, the keys and values of the prompt
tokens (one per query head), the score scale, and how the attended values
join the attention's output. The model types it serves are in
:data:`KINDS`, with the name of their attention modules.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from grafting import LayerCall, UnsupportedLayerError
from grafting.toolkit import model_type


def _heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(batch, tokens, heads·head_dim) -> (batch, heads, tokens, head_dim)."""
    return t.view(*t.shape[:2], -1, head_dim).transpose(1, 2)


def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _position_embeddings(call: LayerCall) -> tuple[torch.Tensor, torch.Tensor]:
    """The (cos, sin) pair the attention was called with, for the rows the adapter sees."""
    found = call.kwargs.get("position_embeddings")
    if found is None and len(call.args) > 1:
        found = call.args[1]
    if found is None:
        raise UnsupportedLayerError(
            f"adaption prompt: {type(call.base_layer).__name__} was called without position_embeddings"
        )
    cos, sin = found
    if call.rows is not None and cos.shape[0] > 1:
        cos, sin = cos[call.rows], sin[call.rows]
    return cos, sin


class AttentionKind:
    """The projections of one family of attention modules, as the adaption prompt uses them."""

    #: Attributes a module of this family has.
    needs: tuple[str, ...] = ()

    def fits(self, module: nn.Module) -> bool:
        """Whether ``module`` has what this family reads (a wrong target is refused when it is adapted)."""
        return all(hasattr(module, name) for name in self.needs)

    def queries(self, attention: nn.Module, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        """The queries of ``x``: (batch, heads, tokens, head_dim)."""
        raise NotImplementedError

    def prompt_keys_values(self, attention: nn.Module, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the prompt tokens: (1, key/value heads, prompt_len, head_dim) each."""
        raise NotImplementedError

    def scale(self, attention: nn.Module) -> float:
        return float(attention.head_dim) ** -0.5

    def output(self, attention: nn.Module, attended: torch.Tensor) -> torch.Tensor:
        """What the attended values (batch, tokens, heads·head_dim) add to the attention's output."""
        raise NotImplementedError


class RotaryAttention(AttentionKind):
    """Llama and Mistral: q/k/v/o projections, rotary positions, grouped key/value heads.

    The queries are rotated to their positions; the prompt keys are not (the
    prompt has no position). The attended values go through ``o_proj``
    without its bias, which the base output already holds.
    """

    needs = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")

    def queries(self, attention: nn.Module, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        q = _heads(attention.q_proj(x), attention.head_dim)
        cos, sin = _position_embeddings(call)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + _rotate_half(q) * sin

    def prompt_keys_values(self, attention: nn.Module, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _heads(attention.k_proj(prompt), attention.head_dim), _heads(
            attention.v_proj(prompt), attention.head_dim
        )

    def scale(self, attention: nn.Module) -> float:
        return float(getattr(attention, "scaling", attention.head_dim**-0.5))

    def output(self, attention: nn.Module, attended: torch.Tensor) -> torch.Tensor:
        out_proj = attention.o_proj
        out = out_proj(attended)
        if getattr(out_proj, "bias", None) is not None:
            out = out - out_proj(torch.zeros_like(attended))  # the linear part only
        return out


class FusedAttention(AttentionKind):
    """GPT-2: one ``c_attn`` projection for q, k and v, no positions in attention.

    As in PEFT's format, the attended values are added to the attention's
    output as they are, without the ``c_proj`` projection.
    """

    needs = ("c_attn", "embed_dim", "head_dim")

    def queries(self, attention: nn.Module, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        q = attention.c_attn(x)[..., : attention.embed_dim]
        return _heads(q, attention.head_dim)

    def prompt_keys_values(self, attention: nn.Module, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, k, v = attention.c_attn(prompt).split(attention.embed_dim, dim=-1)
        return _heads(k, attention.head_dim), _heads(v, attention.head_dim)

    def output(self, attention: nn.Module, attended: torch.Tensor) -> torch.Tensor:
        return attended


class ModelKind(NamedTuple):
    """A supported model type: the name of its attention modules and how to read them."""

    attention: str
    kind: AttentionKind


_ROTARY = RotaryAttention()

#: ``model.config.model_type`` -> its attention modules. The names are PEFT's defaults.
KINDS: dict[str, ModelKind] = {
    "llama": ModelKind("self_attn", _ROTARY),
    "mistral": ModelKind("self_attn", _ROTARY),
    "gpt2": ModelKind("attn", FusedAttention()),
}


def kind_for(model: nn.Module) -> ModelKind:
    """The entry of ``model``'s type; an :class:`UnsupportedLayerError` naming the supported types otherwise."""
    found = KINDS.get(model_type(model) or "")
    if found is None:
        raise UnsupportedLayerError(
            f"adaption prompt does not support model type {model_type(model)!r} ({type(model).__name__}); "
            f"supported: {', '.join(sorted(KINDS))}"
        )
    return found
