"""Finding an adapter folder (local, or on the Hugging Face Hub) and its model card."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch

from grafting.errors import AdapterLoadError
from grafting.io.files import atomic_write_text, load_weights, remap_keys
from grafting.io.transaction import is_bookkeeping


def resolve_adapter_folder(
    model_id: str | os.PathLike[str], subfolder: str | None = None, revision: str | None = None
) -> str:
    """A local folder holding adapter_config.json for ``model_id`` (downloaded if it is a Hub id)."""
    path = os.fspath(model_id)
    local = os.path.join(path, subfolder) if subfolder else path
    if os.path.isdir(local):
        return local
    if not _looks_like_repo_id(path):
        raise AdapterLoadError(f"adapter folder {local} does not exist")
    try:
        from huggingface_hub import snapshot_download

        root = snapshot_download(
            path, revision=revision, allow_patterns=[f"{subfolder + '/' if subfolder else ''}adapter_*", "*.json"]
        )
    except Exception as exc:
        raise AdapterLoadError(f"{path} is neither a local folder nor a reachable Hub repository: {exc}") from None
    return os.path.join(root, subfolder) if subfolder else root


def _looks_like_repo_id(path: str) -> bool:
    """``name`` or ``owner/name``: anything else (absolute, relative, deeper) is a local path."""
    parts = path.split("/")
    return not os.path.exists(path) and 1 <= len(parts) <= 2 and all(p and p not in (".", "..") for p in parts)


CARD_TEMPLATE = """---
{metadata}
---

# Adapter for {base}

This folder holds a {methods} adapter saved by [grafting](https://pypi.org/project/grafting/) in the
PEFT on-disk format (`adapter_config.json` + `adapter_model.safetensors`). Load it with grafting or PEFT:

```python
from grafting import PeftModel
model = PeftModel.from_pretrained(base_model, "path/to/this/folder")
```
"""


def write_model_card(folder: str, *, base_model: str | None, methods: list[str]) -> None:
    """Create or update README.md with PEFT's metadata (library_name, base_model, tags)."""
    from huggingface_hub import ModelCard, ModelCardData

    path = os.path.join(folder, "README.md")
    tags = ["grafting", *[m.lower() for m in methods]]
    if os.path.isfile(path):
        card = ModelCard.load(path)
        data = card.data
        data.library_name = data.library_name or "peft"
        existing = list(data.tags or [])
        data.tags = existing + [t for t in tags if t not in existing]
        if base_model and not getattr(data, "base_model", None):
            data.base_model = base_model
        text = str(card)
    else:
        data = ModelCardData(library_name="peft", base_model=base_model, tags=tags)
        text = CARD_TEMPLATE.format(
            metadata=data.to_yaml(), base=base_model or "a transformers model", methods=" + ".join(methods)
        )
    atomic_write_text(path, text)


def push_folder(
    write: Callable[[str], None],
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
) -> Any:
    """Upload what ``write(folder)`` puts in an empty folder to the Hub model repo ``repo_id`` in one commit.

    The repo is created if missing (``private`` applies then), as is the branch ``revision``. ``tags``
    are added to the model card the folder holds. Returns huggingface_hub's ``CommitInfo``.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        write(folder)
        for name in os.listdir(folder):  # the save lock is the local folder's, not part of the upload
            if is_bookkeeping(name):
                os.remove(os.path.join(folder, name))
        if tags:
            add_card_tags(folder, tags)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or "Upload adapter",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )


def add_card_tags(folder: str, tags: list[str]) -> None:
    """Add ``tags`` to the model card (README.md) in ``folder``."""
    from huggingface_hub import ModelCard

    path = os.path.join(folder, "README.md")
    card = ModelCard.load(path)
    existing = list(card.data.tags or [])
    card.data.tags = existing + [t for t in tags if t not in existing]
    atomic_write_text(path, str(card))


def load_peft_weights(
    model_id: str | os.PathLike[str],
    device: str | None = None,
    key_mapping: dict[str, str] | None = None,
    **hf_hub_download_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """The tensors of a saved adapter (a local folder or a Hub repository), keys as saved (PEFT's helper).

    ``key_mapping`` renames keys (regex -> replacement, the first match wins);
    ``subfolder`` and ``revision`` among the keyword arguments pick where on the Hub.
    """
    folder = resolve_adapter_folder(
        model_id, hf_hub_download_kwargs.get("subfolder"), hf_hub_download_kwargs.get("revision")
    )
    return remap_keys(load_weights(folder, device=device or "cpu"), key_mapping)
