"""Trainable tokens: new values for a few rows of an embedding matrix (and of the output head tied to it).

``trainable_token_indices`` (a list of token ids for the input embedding, or
a dict of module name to ids) trains those rows only. The rows' new values
live in ``token_adapter.trainable_tokens_delta`` (PEFT's key; despite the
name it holds the values, not a difference). As a grafting delta adapter the
change is ``ΔW = new - original`` on those rows: an embedding adds
``ΔW[id]`` to the embedding of each listed id; an output head that shares
the embedding's weight adds ``x · ΔWᵀ`` to the logits of the listed ids,
reading the same rows (one parameter, saved once, under the embedding).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from grafting import (
    AdaptedLayer,
    ConfigError,
    DeltaAdapter,
    LayerCall,
    TargetNotFoundError,
)
from grafting.toolkit import add_to_weight, candidate_modules, name_matches
from grafting_lora.scaled import embed_scale
from grafting_lora.tied import TiedFollower


class TokenRows(nn.Module):
    """The trained rows (``trainable_tokens_delta``) and where each id sits.

    The change is ``new - current`` for the listed rows of the base weight as it is when the layer runs
    (read each time, as PEFT's rows replace the weight's: loading other base rows, say a resized
    vocabulary saved with the adapter, keeps the result ``new``). A merge keeps the rows it replaced
    (``trainable_tokens_original``) for the unmerge.
    """

    def __init__(self, weight: torch.Tensor, token_ids: Sequence[int], init: bool = True) -> None:
        super().__init__()
        num, dim = weight.shape
        ids = torch.tensor(list(token_ids), dtype=torch.long, device=weight.device)
        original = weight.detach()[ids].clone()
        values = original.clone() if init else torch.randn(len(ids), dim, dtype=original.dtype, device=weight.device)
        self.trainable_tokens_delta = nn.Parameter(values)
        # not saved (PEFT saves only the values): the rows a merge replaced
        self.register_buffer("trainable_tokens_original", original, persistent=False)
        self.register_buffer("token_ids", ids, persistent=False)
        # id -> its row here; every other id -> the zero row after them
        slot = torch.full((num,), len(ids), dtype=torch.long, device=weight.device)
        slot[ids] = torch.arange(len(ids), device=weight.device)
        self.register_buffer("slot_of_id", slot, persistent=False)

    def rows_of(self, weight: torch.Tensor) -> torch.Tensor:
        """The listed rows of ``weight`` (one row per token id), detached."""
        return weight.detach().index_select(0, self.token_ids.to(weight.device))

    def change(self, rows: torch.Tensor) -> torch.Tensor:
        """``new - rows`` for the listed rows, in the parameter's dtype."""
        return self.trainable_tokens_delta - rows.to(self.trainable_tokens_delta)

    def full_change(self, num: int, rows: torch.Tensor) -> torch.Tensor:
        """ΔW = ``new - rows`` as a (num, dim) matrix, zero outside the listed rows."""
        change = self.change(rows)
        return change.new_zeros(num, change.shape[1]).index_copy(0, self.token_ids.to(change.device), change)

    def merge_change(self, num: int, weight: torch.Tensor) -> torch.Tensor:
        """ΔW that makes the listed rows of ``weight`` the new values; the replaced rows are kept for unmerge."""
        self.trainable_tokens_original.copy_(self.rows_of(weight))
        return self.full_change(num, self.trainable_tokens_original)

    def unmerge_change(self, num: int) -> torch.Tensor:
        """ΔW of the last merge (subtract it to get the replaced rows back)."""
        return self.full_change(num, self.trainable_tokens_original)


class TrainableTokens(DeltaAdapter):
    """New values for some rows of an ``nn.Embedding`` (saved as ``token_adapter.trainable_tokens_delta``)."""

    peft_base_path = "token_adapter.base_layer"  # PEFT's TrainableTokensLayer wraps the layer there

    def __init__(self, base_layer: nn.Embedding, token_ids: Sequence[int], init: bool = True) -> None:
        super().__init__()
        embed_scale(base_layer)  # refuse a scale that is not one number before anything is built
        self.token_adapter = TokenRows(base_layer.weight, token_ids, init)

    def forward(self, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        rows = self.token_adapter
        change = rows.change(rows.rows_of(call.base_layer.weight))
        table = torch.cat([change, change.new_zeros(1, change.shape[1])])
        out = F.embedding(rows.slot_of_id[x], table)
        scale = embed_scale(call.base_layer)  # a scaled embedding (Gemma 3) scales its rows: the change's too
        return out if scale is None else out * scale.to(device=out.device, dtype=out.dtype)

    def merge(self, base_layer: nn.Module) -> None:
        add_to_weight(base_layer, self.token_adapter.merge_change(base_layer.num_embeddings, base_layer.weight).T)

    def unmerge(self, base_layer: nn.Module) -> None:
        add_to_weight(base_layer, self.token_adapter.unmerge_change(base_layer.num_embeddings).T, alpha=-1.0)


def _logit_change(rows: TokenRows, x: torch.Tensor, weight: torch.Tensor, n_out: int) -> torch.Tensor:
    """``x · ΔWᵀ`` for an output head of ``weight``: the logits of the listed ids change, the others do not."""
    change = rows.change(rows.rows_of(weight))
    logits = F.linear(x.to(change.dtype), change)  # (..., n_ids)
    out = logits.new_zeros(*logits.shape[:-1], n_out)
    return out.index_copy(-1, rows.token_ids.to(out.device), logits)


class TrainableTokensHead(DeltaAdapter):
    """New values for some rows of an output head (``nn.Linear``, one row per token id), its own rows."""

    peft_base_path = "token_adapter.base_layer"  # PEFT's TrainableTokensLayer wraps the layer there

    def __init__(self, base_layer: nn.Linear, token_ids: Sequence[int], init: bool = True) -> None:
        super().__init__()
        self.token_adapter = TokenRows(base_layer.weight, token_ids, init)

    def forward(self, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        return _logit_change(self.token_adapter, x, call.base_layer.weight, call.base_out.shape[-1])

    def merge(self, base_layer: nn.Module) -> None:
        add_to_weight(base_layer, self.token_adapter.merge_change(base_layer.out_features, base_layer.weight))

    def unmerge(self, base_layer: nn.Module) -> None:
        add_to_weight(base_layer, self.token_adapter.unmerge_change(base_layer.out_features), alpha=-1.0)


class TiedTrainableTokens(TiedFollower[TrainableTokens]):
    """The listed rows of an output head that shares its weight with an embedding carrying :class:`TrainableTokens`.

    It reads the embedding adapter's rows (saved once, under the embedding); a merge into the
    shared weight is the embedding adapter's.
    """

    peft_base_path = "token_adapter.base_layer"  # PEFT's TrainableTokensLayer wraps the layer there
    untied = (
        "the embedding whose trainable tokens it follows; merge the embedding's adapter into each weight separately"
    )

    def __init__(self, base_layer: nn.Module, embedding: TrainableTokens, shared_weight: torch.Tensor) -> None:
        super().__init__(embedding, shared_weight)

    def forward(self, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        return _logit_change(self.tied_to.token_adapter, x, call.base_layer.weight, call.base_out.shape[-1])


@attrs.frozen
class TokenPlan:
    """Which modules carry trainable tokens: ``own`` (path -> ids) and ``tied`` (head path -> embedding path)."""

    own: dict[str, list[int]]
    tied: dict[str, str]

    @property
    def paths(self) -> set[str]:
        return set(self.own) | set(self.tied)


def _unwrapped(module: nn.Module | None) -> nn.Module | None:
    return module.base_layer if isinstance(module, AdaptedLayer) else module


def _path_of(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    for name, candidate in candidate_modules(model):
        if candidate is module or _unwrapped(candidate) is module:
            return name
    return None


def _embeddings(model: nn.Module, getter: str) -> nn.Module | None:
    fn = getattr(model, getter, None)
    return _unwrapped(fn()) if callable(fn) else None


def token_plan(spec: list[int] | dict[str, list[int]], model: nn.Module, *, ensure_tying: bool = False) -> TokenPlan:
    """Resolve ``trainable_token_indices`` on ``model`` (logical module names, as PEFT matches them).

    A list targets the input embedding (``embed_tokens`` when the model does not say
    which it is); a dict maps module names (exact or dotted suffix) to ids. An output
    head sharing the input embedding's weight follows its rows, unless the dict gives
    the head other ids (then it has its own rows; with ``ensure_tying`` that is an error).
    """
    embedding = _embeddings(model, "get_input_embeddings")
    embedding_path = _path_of(model, embedding)
    wanted = dict(spec) if isinstance(spec, dict) else {embedding_path or "embed_tokens": list(spec)}
    names = [n for n, _ in candidate_modules(model)]
    own: dict[str, list[int]] = {}
    for key, ids in wanted.items():
        found = [n for n in names if name_matches(n, [key])]
        if not found:
            raise TargetNotFoundError(f"LoraConfig.trainable_token_indices: no module named {key!r} in the model")
        for name in found:
            own[name] = list(ids)
    tied: dict[str, str] = {}
    head = _embeddings(model, "get_output_embeddings")
    head_path = _path_of(model, head)
    shared = head is not None and embedding is not None and getattr(head, "weight", None) is embedding.weight
    if shared and embedding_path in own and head_path is not None:
        if head_path in own and own[head_path] != own[embedding_path]:
            if ensure_tying:
                raise ConfigError(
                    f"LoraConfig.trainable_token_indices: {embedding_path} and {head_path} share their weight but are"
                    f" given different ids ({own[embedding_path]} and {own[head_path]}); ensure_weight_tying=True"
                    " needs the same ids for both"
                )
        else:
            own.pop(head_path, None)
            tied[head_path] = embedding_path
    return TokenPlan(own=own, tied=tied)


def tied_embedding_paths(model: nn.Module) -> tuple[str, str] | None:
    """(input embedding path, output head path) when the head shares the embedding's weight, else None."""
    embedding, head = _embeddings(model, "get_input_embeddings"), _embeddings(model, "get_output_embeddings")
    if embedding is None or head is None or getattr(head, "weight", None) is not embedding.weight:
        return None
    paths = _path_of(model, embedding), _path_of(model, head)
    return None if paths[0] is None or paths[1] is None else (paths[0], paths[1])


def check_weight_tying(config: Any, model: nn.Module) -> None:
    """``ensure_weight_tying=True``: trainable tokens follow the tie (``token_plan``); LoRA on a tied embedding
    is tied by the core's plan (``grafting.model.tying``) and :class:`~grafting_lora.tying.TiedLoraHead`; DoRA there
    is refused (each layer's magnitude rescales the one shared weight its own way)."""
    tied = tied_embedding_paths(model)
    if tied is None or not config.use_dora:
        return
    spec = config.target_modules
    if spec is not None and spec != "all-linear" and any(name_matches(p, spec) for p in tied):
        raise ConfigError(
            f"LoraConfig: ensure_weight_tying=True with use_dora=True on the tied embedding ({tied[0]}, shared with"
            f" {tied[1]}) is not implemented in grafting: DoRA rescales each layer's rows by its own magnitude, so"
            " the two layers cannot share one weight; use plain LoRA there, or ensure_weight_tying=False"
        )
