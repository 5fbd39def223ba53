"""``PeftModel.push_to_hub`` uploads exactly what ``save_pretrained`` writes, through huggingface_hub's HfApi.

HfApi is replaced by a recorder (there is no network): it keeps every call and the bytes of every
uploaded file, which the tests compare with a local save and load in peft.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import huggingface_hub
import pytest
import torch

import grafting
from grafting.testing import assert_close
from tests.helpers import adapted, files_under, inputs, logits, randomize


class RecordingHfApi:
    """The part of ``huggingface_hub.HfApi`` a push uses; records calls and uploaded files."""

    instances: ClassVar[list[RecordingHfApi]] = []

    def __init__(self, token: Any = None, **kwargs: Any) -> None:
        self.token = token
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.uploaded: dict[str, bytes] = {}
        RecordingHfApi.instances.append(self)

    def create_repo(self, repo_id: str, **kwargs: Any) -> Any:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"someone/{repo_id}")

    def create_branch(self, repo_id: str, **kwargs: Any) -> None:
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, *, folder_path: str, **kwargs: Any) -> Any:
        self.calls.append(("upload_folder", kwargs))
        root = Path(folder_path)
        self.uploaded = {name: (root / name).read_bytes() for name in files_under(root)}
        return SimpleNamespace(oid="0" * 40, commit_url="https://huggingface.co/fake/commit")


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> type[RecordingHfApi]:
    RecordingHfApi.instances = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    return RecordingHfApi


def saved_files(model: Any, folder: Path, **kwargs: Any) -> dict[str, bytes]:
    model.save_pretrained(folder, **kwargs)
    return {name: (folder / name).read_bytes() for name in files_under(folder)}


def test_push_uploads_the_saved_folder_in_one_commit(hub: type[RecordingHfApi], tmp_path: Path) -> None:
    model = adapted("llama")
    model.add_adapter("other", grafting.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    randomize(model, 1)
    commit = model.push_to_hub("someone/my-adapter", private=True, token="hf_secret", commit_message="first")
    (api,) = hub.instances
    assert api.token == "hf_secret"
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1] == {"repo_id": "someone/my-adapter", "private": True, "exist_ok": True, "repo_type": "model"}
    upload = api.calls[1][1]
    assert upload["repo_id"] == "someone/my-adapter"
    assert upload["commit_message"] == "first"
    assert upload["revision"] is None
    assert upload["create_pr"] is False
    assert commit.oid == "0" * 40
    assert api.uploaded == saved_files(model, tmp_path / "local")  # names and bytes, model card included
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "other/adapter_config.json"} <= set(
        api.uploaded
    )


def test_pushed_files_load_in_peft_with_the_same_logits(hub: type[RecordingHfApi], tmp_path: Path) -> None:
    import peft

    from tests.helpers import base_model

    model = adapted("llama")
    randomize(model, 2)
    expected = logits(model, "llama")
    model.push_to_hub("my-adapter")
    folder = tmp_path / "downloaded"
    for name, data in hub.instances[0].uploaded.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    theirs = peft.PeftModel.from_pretrained(base_model("llama"), str(folder)).eval()
    with torch.no_grad():
        assert_close(theirs(**inputs("llama")).logits, expected, changed_from=logits(base_model("llama"), "llama"))


def test_push_to_a_branch_with_tags_and_selected_adapters(hub: type[RecordingHfApi], tmp_path: Path) -> None:
    model = adapted("llama")
    model.add_adapter("other", grafting.LoraConfig(r=2, target_modules=["k_proj"]))
    model.push_to_hub("someone/repo", revision="v2", tags=["chat", "grafting"], selected_adapters=["other"])
    api = hub.instances[0]
    assert [name for name, _ in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[1][1] == {"repo_id": "someone/repo", "branch": "v2", "exist_ok": True}
    assert api.calls[2][1]["revision"] == "v2"
    assert set(api.uploaded) == {"README.md", "other/adapter_config.json", "other/adapter_model.safetensors"}
    card = huggingface_hub.ModelCard(api.uploaded["README.md"].decode())
    assert card.data.library_name == "peft"
    assert set(card.data.tags) == {"grafting", "lora", "chat"}


def test_a_pull_request_creates_no_branch(hub: type[RecordingHfApi]) -> None:
    adapted("llama").push_to_hub("someone/repo", revision="main", create_pr=True, commit_description="why")
    api = hub.instances[0]
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[1][1]["create_pr"] is True
    assert api.calls[1][1]["commit_description"] == "why"
