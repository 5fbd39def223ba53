"""Whether a save carries the base model's embedding layers (``save_embedding_layers``), as PEFT decides.

``"auto"`` saves them, with a warning, when the adapter's ``target_modules`` names an embedding layer
(``embed_tokens`` or ``lm_head``: the adapted layers' base weights then go with it, so a vocabulary grown
for training comes back) and it does not train single token rows instead (trainable tokens), or when the
model's vocabulary differs from its base model's config (it was resized during fine-tuning: both
embedding layers go).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any

from torch import nn

from grafting.errors import ConfigError, GraftingWarning
from grafting.model.matching import ALL_LINEAR

#: The module names PEFT recognises as embedding layers in ``target_modules``.
EMBEDDING_NAMES = ("embed_tokens", "lm_head")


def targets_embeddings(config: Any, base_model: nn.Module) -> bool:
    """True when ``config.target_modules`` names an embedding layer (a list entry, or a regex matching one)."""
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str):
        if targets == ALL_LINEAR:  # all-linear leaves the output embedding out
            return False
        return any(
            re.fullmatch(targets, name)
            for name, _ in base_model.named_modules()
            if any(re.match(rf"(.*\.)?{emb}$", name) for emb in EMBEDDING_NAMES)
        )
    return any(emb in (targets or ()) for emb in EMBEDDING_NAMES)


def vocab_resized(model_config: Any, base_name: str | None, revision: str | None = None) -> bool:
    """True when ``model_config.vocab_size`` differs from the one in the base model's config.

    The base config is read from the folder ``base_name``, else from the Hub (never in offline mode);
    when it cannot be read, a warning says the vocabulary is taken as unchanged.
    ``revision``: the base model's (``config.revision``), for the Hub.
    """
    vocab = getattr(model_config, "vocab_size", None)
    if not vocab or not base_name:
        return False
    base_vocab = _saved_vocab_size(base_name, revision)
    if base_vocab is None:
        warnings.warn(
            f"cannot read the config of the base model {base_name!r}: its vocabulary is taken as unchanged"
            " (the embedding layers are not saved)",
            GraftingWarning,
            stacklevel=5,
        )
        return False
    return base_vocab != vocab


#: The largest base-model config.json read to learn its vocabulary size.
MAX_BASE_CONFIG_BYTES = 1 << 20


def _saved_vocab_size(base_name: str, revision: str | None) -> int | None:
    """``vocab_size`` of the base model's config.json: a local folder's, else the copy in the local Hub cache.

    A save never goes to the network; a file that is not a small JSON object holding an integer
    ``vocab_size`` (too large, not JSON, a link to a device) gives None.
    """
    path = os.path.join(base_name, "config.json")
    if not os.path.isfile(path):
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(base_name, "config.json", revision=revision)
        except Exception:  # not a valid repo id
            return None
        if not isinstance(cached, str):
            return None
        path = cached
    try:
        if not os.path.isfile(path) or os.path.getsize(path) > MAX_BASE_CONFIG_BYTES:
            return None
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError, RecursionError):
        return None
    value = data.get("vocab_size") if isinstance(data, dict) else None
    if value is None and isinstance(data, dict) and isinstance(data.get("text_config"), dict):
        value = data["text_config"].get("vocab_size")  # a multimodal config keeps it in its text part
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def saves_embeddings(choice: bool | str, config: Any, base_model: nn.Module) -> tuple[bool, bool]:
    """``(save, targeted)``: whether the embedding layers are saved, and whether the config targets them.

    ``choice`` is ``save_embedding_layers``: True, False or ``"auto"``.
    """
    if not isinstance(choice, bool) and choice != "auto":
        raise ConfigError(f"save_embedding_layers must be True, False or 'auto', not {choice!r}")
    targeted = targets_embeddings(config, base_model)
    if isinstance(choice, bool):
        return choice, targeted
    if targeted and not config.trains_token_rows():
        why = "embedding layers found in `target_modules`"
    elif vocab_resized(getattr(base_model, "config", None), config.base_model_name_or_path, config.revision):
        why = "the embedding layer has been resized during finetuning"
    else:
        return False, targeted
    warnings.warn(  # PEFT's sentence, which user code matches
        f"Setting `save_embedding_layers` to `True` as {why}. (save_embedding_layers='auto')",
        GraftingWarning,
        stacklevel=3,
    )
    return True, targeted
