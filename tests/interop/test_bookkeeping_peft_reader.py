"""Issue 25's row 12 with PEFT as the reader: while grafting saves into a folder, PEFT lists and loads the
folder's adapters as before (the rest of the save machinery is tests/test_bookkeeping.py, on toy methods)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from grafting.io import transaction
from tests.helpers import adapted, base_model, lora, randomize

CONFIG = "adapter_config.json"


def two_adapters(seed: int) -> Any:
    model = adapted("llama", lora("llama", r=2))
    model.add_adapter("other", lora("llama", r=3))
    randomize(model, seed)
    randomize(model, seed + 1, adapter_name="other")
    return model


def test_row12_readers_that_bypass_grafting_never_see_the_staging_folder_as_an_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a save runs (here: just before its commit), PEFT lists and loads the folder's adapters as before."""
    import peft

    old = two_adapters(1)
    old.save_pretrained(tmp_path)
    real = transaction._commit
    checked: list[list[str]] = []

    def peft_reads_then_commit(root: str, *args: Any) -> None:
        staging = [e for e in os.listdir(root) if e.startswith(transaction.STAGING_PREFIX)]
        assert staging, "the save stages inside the folder"
        subfolders = sorted(e for e in os.listdir(root) if os.path.isfile(os.path.join(root, e, CONFIG)))
        checked.append(subfolders)
        model = peft.PeftModel.from_pretrained(base_model("llama"), root)
        for sub in subfolders:
            model.load_adapter(root, adapter_name=sub, subfolder=sub)
        real(root, *args)

    monkeypatch.setattr(transaction, "_commit", peft_reads_then_commit)
    two_adapters(2).save_pretrained(tmp_path)
    assert checked == [["other"]]
