"""Adapters on tied weights: an input embedding whose weight the output head shares (PEFT's ``ensure_weight_tying``).

When a config asks for it (:meth:`AdapterConfig.ties_weights`) and names the embedding
or the head in ``modules_to_save`` or ``target_modules`` (PEFT decides by the names
``embed_tokens``/``lm_head``, so files stay interchangeable), the option is rewritten
as PEFT rewrites it (the input embedding added, the tied head dropped) and the head
becomes a *partner*: its trained copy shares the embedding copy's parameters
(``modules_to_save``, done here in the core), or its layer adapter reads the embedding
adapter's tensors (``target_modules``, done by the method's create hook).
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import attrs
from torch import nn

from grafting.errors import TiedWeightsWarning
from grafting.model.layer import AdaptedLayer
from grafting.model.matching import candidate_modules
from grafting.model.modules_to_save import ModulesToSaveWrapper

#: The module names PEFT looks for in the options to decide whether an embedding is adapted.
EMBEDDING_NAMES = ("embed_tokens", "lm_head")


@attrs.frozen
class TiedEmbedding:
    """The input embedding (logical path) and the modules that share its weight (the output head)."""

    embedding: str
    partners: tuple[str, ...]


@attrs.frozen
class WeightTying:
    """How one adapter ties: through ``option`` (``"modules_to_save"`` or ``"target_modules"``)."""

    option: str
    embedding: str
    partners: tuple[str, ...]


def _unwrapped(module: Any) -> Any:

    while isinstance(module, (AdaptedLayer, ModulesToSaveWrapper)):
        module = module.base_layer if isinstance(module, AdaptedLayer) else module.original_module
    return module


def tied_embedding(model: nn.Module) -> TiedEmbedding | None:
    """The input embedding and the modules sharing its weight, by logical name; None when nothing is tied."""
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embedding = _unwrapped(getter()) if callable(getter) else None
    except (NotImplementedError, AttributeError):
        return None
    weight = getattr(embedding, "weight", None)
    if weight is None:
        return None
    path, partners = None, []
    for name, module in candidate_modules(model):
        inner = _unwrapped(module)
        if inner is embedding:
            path = path or name
        elif getattr(inner, "weight", None) is weight:
            partners.append(name)
    if path is None or not partners:
        return None
    return TiedEmbedding(path, tuple(partners))


def names_embedding(spec: list[str] | str | None) -> bool:
    """PEFT's test: a list entry whose last part is ``embed_tokens``/``lm_head``, or a regex matching either."""
    if not spec:
        return False
    if isinstance(spec, str):
        return any(re.fullmatch(spec, name) for name in EMBEDDING_NAMES)
    return any(entry.split(".")[-1] in EMBEDDING_NAMES for entry in spec)


def _without_partners(entries: list[str], partners: tuple[str, ...]) -> list[str]:
    """``entries`` less the first one naming each partner (the embedding adapter covers it)."""
    out = list(entries)
    for partner in partners:
        for entry in out:
            if re.match(rf"(^|.*\.){re.escape(entry)}($|\..*)", partner):
                out.remove(entry)
                break
    return out


def _with_embedding(spec: list[str] | str | None, embedding: str, partners: tuple[str, ...]) -> list[str] | str:
    if isinstance(spec, str):
        return rf"(?:{spec}|^{re.escape(embedding)}$)"
    entries = list(spec or [])
    if embedding not in entries:
        entries.append(embedding)
    rewritten = _without_partners(entries, partners)
    # PEFT drops the head's entry; where the embedding is not called embed_tokens (GPT-2's wte) that would
    # leave no name by which a later load (PEFT's or ours) sees the tie, so the head's entry stays
    return rewritten if names_embedding(rewritten) else entries


def plan_weight_tying(config: Any, model: nn.Module) -> tuple[Any, WeightTying | None]:
    """``config`` rewritten for tied adapters (a copy, or itself) and how its adapter ties, as PEFT does.

    Warns, as PEFT does, when ``ensure_weight_tying`` finds nothing to tie, and when an
    adapter acts on a tied embedding without it.
    """
    ensure = config.ties_weights()
    saved_named = names_embedding(config.modules_to_save)
    target_named = names_embedding(config.target_modules)
    tied = tied_embedding(model)
    name = type(config).__name__
    if ensure:
        if tied is None:
            warnings.warn(
                f"{name}.ensure_weight_tying=True, but the model's input embedding shares its weight with no other"
                " module; nothing is tied",
                TiedWeightsWarning,
                stacklevel=4,
            )
            return config, None
        option = "modules_to_save" if saved_named else "target_modules" if target_named else None
        if option is None:
            warnings.warn(
                f"{name}.ensure_weight_tying=True, but neither modules_to_save nor target_modules names the tied"
                f" embedding ({tied.embedding}, shared with {', '.join(tied.partners)}) as embed_tokens or lm_head:"
                " no layer adapter or trained copy is tied",
                TiedWeightsWarning,
                stacklevel=4,
            )
            return config, None
        value = _with_embedding(getattr(config, option), tied.embedding, tied.partners)
        rewritten = config if value == getattr(config, option) else attrs.evolve(config, **{option: value})
        return rewritten, WeightTying(option, tied.embedding, tied.partners)
    if (saved_named or target_named) and tied is not None:
        how = "set ensure_weight_tying=True to tie them" if ensure is False else "this method cannot tie adapters"
        effect = (
            "a merge changes the weight both use, so the merged model computes differently from the unmerged one"
            if target_named
            else "a trained copy replaces only one of them"
        )
        warnings.warn(
            f"{name}: the adapter acts on {tied.embedding} or {', '.join(tied.partners)}, which share one weight,"
            f" but its adapters will not be tied ({how}); {effect}",
            TiedWeightsWarning,
            stacklevel=4,
        )
    return config, None
