"""LoRA's part of hot-swapping (:mod:`grafting.api.hotswap`), for its linear, embedding and convolution layers:
zero padding to a target rank (``B·A`` unchanged), a saved adapter's values in the loaded one's shapes, a
different scaling folded into ``B`` (the forward's Python scaling stays), and the values that leave a layer as
its base layer (for a new adapter that targets fewer layers)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from grafting import AdapterStateError
from grafting.toolkit import dense_weight, fit_state, grow_tensor, require_same, zeros_state
from grafting_lora.magnitude import wide
from grafting_lora.reference import dora_norm

#: The rank dimension of each factor, by state_dict key: A is (r, in[, k...]), B is (out, r[, 1...]).
FACTOR_RANK_DIMS = {"lora_A.weight": (0,), "lora_B.weight": (1,)}
EMBEDDING_RANK_DIMS = {"lora_embedding_A": (0,), "lora_embedding_B": (1,)}


def pad_pair(adapter: Any, rank: int) -> None:
    """Grow ``lora_A`` (r, in[, k...]) and ``lora_B`` (out, r[, 1...]), modules or parameters, to ``rank``."""
    if hasattr(adapter, "lora_A"):
        if getattr(adapter.lora_B, "groups", 1) > 1 and rank != adapter.r:
            raise AdapterStateError(
                f"a LoRA adapter on a grouped convolution (groups={adapter.lora_B.groups}) keeps its rank {adapter.r}:"
                " zeros added to a grouped B would change its groups"
            )
        grow_tensor(adapter.lora_A, "weight", rank, (0,))
        grow_tensor(adapter.lora_B, "weight", rank, (1,))
        for module, attribute in ((adapter.lora_A, "out_features"), (adapter.lora_A, "out_channels")):
            if hasattr(module, attribute):
                setattr(module, attribute, rank)
        for module, attribute in ((adapter.lora_B, "in_features"), (adapter.lora_B, "in_channels")):
            if hasattr(module, attribute):
                setattr(module, attribute, rank)
    else:
        grow_tensor(adapter, "lora_embedding_A", rank, (0,))
        grow_tensor(adapter, "lora_embedding_B", rank, (1,))
    adapter.r = rank


def swap_values(
    adapter: Any, tensors: dict[str, torch.Tensor], config: Any, module_name: str
) -> dict[str, torch.Tensor]:
    """The loaded adapter's values for a saved LoRA adapter of rank <= its own (padded) rank, any alpha."""
    embedding = not hasattr(adapter, "lora_A")
    a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
    if a_key not in tensors or b_key not in tensors:
        raise AdapterStateError(f"the new adapter lacks {a_key}/{b_key} here (it holds {sorted(tensors)})")
    bias = not embedding and adapter.lora_B.bias is not None
    dora = "lora_magnitude_vector" in adapter.state_dict(keep_vars=True)  # DoraEmbedding/DoraConv have no use_dora
    if bool(config.use_dora) != dora or bool(config.lora_bias) != bias:
        raise AdapterStateError("the new adapter differs in use_dora or lora_bias: hot-swapping keeps the structure")
    if not embedding:
        require_same("lora_dropout", float(config.lora_dropout), float(getattr(adapter.lora_dropout, "p", 0.0)))
    ratio = config.scaling_for(module_name) / adapter.scaling  # the forward keeps its scaling: fold the change into B
    b_prefix = "lora_embedding_B" if embedding else "lora_B."  # B's weight and its bias carry the scaling
    scaled = {key: value.double() * ratio if key.startswith(b_prefix) else value for key, value in tensors.items()}
    return fit_state(adapter, scaled, EMBEDDING_RANK_DIMS if embedding else FACTOR_RANK_DIMS)


def blank_values(adapter: Any, base_layer: nn.Module) -> dict[str, torch.Tensor]:
    """Zeros for ``A``, ``B`` (and ``B``'s bias): no delta. DoRA's magnitude becomes the base weight's row norms
    ``‖W‖``, so its scale ``m / ‖W + 0‖`` is one and the layer computes the base layer's output (a zero magnitude
    would scale the base output to zero)."""
    values = zeros_state(adapter)
    if "lora_magnitude_vector" in values:
        weight = wide(dense_weight(base_layer))
        norm = dora_norm(weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
        values["lora_magnitude_vector"] = norm.reshape(values["lora_magnitude_vector"].shape)
    return values


class PairHotSwap:
    """The protocol's hot-swap methods for LoRA's linear, embedding and convolution adapters (one A, one B)."""

    def pad_rank(self, rank: int) -> None:
        pad_pair(self, rank)

    def hotswap_values(
        self, tensors: dict[str, torch.Tensor], config: Any, module_name: str
    ) -> dict[str, torch.Tensor]:
        return swap_values(self, tensors, config, module_name)

    def hotswap_blank_values(self, base_layer: nn.Module) -> dict[str, torch.Tensor]:
        return blank_values(self, base_layer)
