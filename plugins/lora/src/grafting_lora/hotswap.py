"""LoRA's part of hot-swapping (:mod:`grafting.hotswap`): zero padding to a target rank, and a saved adapter's
values in the loaded one's shapes, a different scaling folded into ``B`` (the forward's Python scaling stays)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from grafting import AdapterStateError


def pad_pair(adapter: Any, rank: int) -> None:
    """Grow ``lora_A`` (r, in) and ``lora_B`` (out, r) to ``rank`` with zeros: ``B·A`` is unchanged."""
    a, b = adapter.lora_A.weight, adapter.lora_B.weight
    if rank < a.shape[0]:
        raise AdapterStateError(f"a LoRA adapter of rank {a.shape[0]} cannot shrink to target_rank={rank}")
    if rank == a.shape[0]:
        return
    with torch.no_grad():
        grown_a = a.new_zeros(rank, a.shape[1])
        grown_b = b.new_zeros(b.shape[0], rank)
        grown_a[: a.shape[0]] = a
        grown_b[:, : b.shape[1]] = b
    adapter.lora_A.weight = nn.Parameter(grown_a, requires_grad=a.requires_grad)
    adapter.lora_B.weight = nn.Parameter(grown_b, requires_grad=b.requires_grad)
    adapter.lora_A.out_features = adapter.lora_B.in_features = rank


def swap_values(
    adapter: Any, tensors: dict[str, torch.Tensor], config: Any, module_name: str
) -> dict[str, torch.Tensor]:
    """The loaded adapter's values for a saved LoRA adapter of rank <= its own (padded) rank, any alpha."""
    if "lora_A.weight" not in tensors or "lora_B.weight" not in tensors:
        raise AdapterStateError(f"the new adapter lacks lora_A/lora_B here (it holds {sorted(tensors)})")
    a, b = tensors["lora_A.weight"], tensors["lora_B.weight"]
    capacity = adapter.lora_A.weight.shape[0]
    if a.shape[0] > capacity:
        raise AdapterStateError(
            f"the new adapter's rank {a.shape[0]} exceeds the loaded one's {capacity}: call"
            " prepare_model_for_compiled_hotswap(model, target_rank=...) before compiling"
        )
    if bool(config.use_dora) != bool(adapter.use_dora) or bool(config.lora_bias) != (adapter.lora_B.bias is not None):
        raise AdapterStateError("the new adapter differs in use_dora or lora_bias: hot-swapping keeps the structure")
    dropout = getattr(adapter.lora_dropout, "p", 0.0)
    if float(config.lora_dropout) != float(dropout):
        raise AdapterStateError(f"the new adapter's lora_dropout {config.lora_dropout} differs from {dropout}")
    ratio = config.scaling_for(module_name) / adapter.scaling  # the forward keeps its scaling: fold the change into B
    padded_a = a.new_zeros(capacity, a.shape[1], dtype=torch.float64)
    padded_b = b.new_zeros(b.shape[0], capacity, dtype=torch.float64)
    padded_a[: a.shape[0]] = a.double()
    padded_b[:, : b.shape[1]] = b.double() * ratio
    values = {"lora_A.weight": padded_a, "lora_B.weight": padded_b}
    if adapter.use_dora:
        values["lora_magnitude_vector"] = tensors["lora_magnitude_vector"]
    if adapter.lora_B.bias is not None:
        values["lora_B.bias"] = tensors["lora_B.bias"].double() * ratio
    return values
