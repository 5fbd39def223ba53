"""Whether a save carries the base model's embedding layers (``save_embedding_layers``), as PEFT decides.

``"auto"`` saves them, with a warning, when the adapter's ``target_modules`` names an embedding layer
(``embed_tokens`` or ``lm_head``: the adapted layers' base weights then go with it, so a vocabulary grown
for training comes back) and it does not train single token rows instead (trainable tokens), or when the
model's vocabulary differs from its base model's config (it was resized during fine-tuning: both
embedding layers go).
"""

from __future__ import annotations

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
    if not os.path.isfile(os.path.join(base_name, "config.json")):
        found = _on_hub(base_name, revision)
        if found is None:
            warnings.warn(
                f"cannot read the config of the base model {base_name!r}: its vocabulary is taken as unchanged"
                " (the embedding layers are not saved)",
                GraftingWarning,
                stacklevel=5,
            )
        if not found:
            return False
    base = type(model_config).from_pretrained(base_name, revision=revision)
    return getattr(base, "vocab_size", vocab) != vocab


def _on_hub(repo_id: str, revision: str | None) -> bool | None:
    """Whether the Hub repo ``repo_id`` has a config.json; None when that cannot be known (offline, no network)."""
    import huggingface_hub

    set_now = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    if set_now or huggingface_hub.constants.HF_HUB_OFFLINE:
        return None
    try:
        return bool(huggingface_hub.file_exists(repo_id, "config.json", revision=revision))
    except Exception:  # an invalid repo id, no network, no access: unknown
        return None


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
        why = "target_modules names one"
    elif vocab_resized(getattr(base_model, "config", None), config.base_model_name_or_path, config.revision):
        why = "the vocabulary was resized since the base model was loaded"
    else:
        return False, targeted
    warnings.warn(f"save_embedding_layers='auto' saves the embedding layers: {why}", GraftingWarning, stacklevel=3)
    return True, targeted
