"""LoRA on an output head tied to the input embedding (``ensure_weight_tying=True``).

The head's weight is the embedding's, transposed in use: ``logits = x·Wᵀ`` where
the embedding looks rows of ``W`` up. So the embedding's LoRA, ``ΔW = (B·A)ᵀ·s``,
is the head's too: ``lora_A = Bᵀ`` and ``lora_B = Aᵀ``. :class:`TiedLoraHead`
holds no tensor of its own; it reads the embedding adapter's (one parameter each,
so gradients from both layers add up in one place) and saves them transposed
under PEFT's head keys ``lora_A.weight``/``lora_B.weight``. A merge into the one
shared weight is the embedding adapter's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from grafting import LayerCall
from grafting.toolkit import compute_dtype
from grafting_lora.layers import LoraEmbedding
from grafting_lora.reference import delta_weight, lora_delta
from grafting_lora.tied import TiedFollower


class TransposedFactor(nn.Module):
    """``weight`` is the transpose of a parameter of another adapter (a view: reads and writes reach it)."""

    def __init__(self, owner: nn.Module, attr: str) -> None:
        super().__init__()
        self._source = (owner, attr)  # a tuple: not registered, not saved twice
        self.register_state_dict_post_hook(_save_weight)
        self.register_load_state_dict_pre_hook(_load_weight)

    @property
    def weight(self) -> torch.Tensor:
        owner, attr = self._source
        return getattr(owner, attr).T

    def __setattr__(self, name: str, value: Any) -> None:
        if name != "weight":
            super().__setattr__(name, value)
            return
        owner, attr = self._source  # a loader materializing a meta tensor: the source parameter takes it
        current = getattr(owner, attr)
        setattr(owner, attr, nn.Parameter(value.detach().T, requires_grad=current.requires_grad))


def _save_weight(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    state_dict[prefix + "weight"] = module.weight.detach()


def _load_weight(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` of a whole model: the key is the source's, transposed (checked alike)."""
    value = state_dict.pop(prefix + "weight", None)
    if value is not None:
        with torch.no_grad():
            module.weight.copy_(value)


class TiedLoraHead(TiedFollower[LoraEmbedding]):
    """``delta = dropout(x)·B_e·A_e·s``: the embedding adapter's LoRA seen from the tied output head."""

    lora_convertible = True
    #: as :attr:`LoraLinear.precision`
    precision: str = "input"

    untied = "the input embedding whose LoRA it follows (ensure_weight_tying); untie the adapters before merging"

    def __init__(self, embedding: LoraEmbedding, shared_weight: torch.Tensor, scaling: float, dropout: float) -> None:
        super().__init__(embedding, shared_weight)
        self.r, self.scaling = embedding.r, scaling
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = TransposedFactor(embedding, "lora_embedding_B")
        self.lora_B = TransposedFactor(embedding, "lora_embedding_A")

    def delta_matrix(self) -> torch.Tensor:
        """``B·A·scaling`` as the head's (out, in) matrix."""
        return delta_weight(self.lora_A.weight, self.lora_B.weight, self.scaling)

    def forward(self, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        a = self.lora_A.weight
        dtype = compute_dtype(self.precision, a.dtype, x, where="LoRA")
        h = self.lora_dropout(x.to(dtype))
        return lora_delta(h, a.to(dtype), self.lora_B.weight.to(dtype), self.scaling)
