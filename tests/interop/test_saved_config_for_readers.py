"""adapter_config.json as PEFT writes it where other readers look: resolved target_modules, peft_version.

Serving stacks (vLLM, SGLang) read ``target_modules`` to decide which layers get LoRA; PEFT writes
the model's default names there when the user left them out, and records ``peft_version``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
from packaging.version import Version

import grafting
from tests.helpers import base_model, peft_config

DEFAULTED: dict[str, Any] = {
    "lora": grafting.LoraConfig(r=2),
    "ia3": grafting.IA3Config(),
    "loha": grafting.LoHaConfig(r=2),
}


def saved_config(model: Any, folder: Path) -> dict[str, Any]:
    model.save_pretrained(folder)
    return json.loads((folder / "adapter_config.json").read_text())


#: Every method and architecture where PEFT has default targets (its LoHa cannot adapt GPT-2's Conv1D).
CASES = [(m, a) for m in DEFAULTED for a in ("llama", "gpt2", "bert", "t5") if (m, a) != ("loha", "gpt2")]


@pytest.mark.parametrize(("method", "arch"), CASES)
def test_defaulted_target_modules_are_saved_resolved_as_peft_saves_them(method: str, arch: str, tmp_path: Path) -> None:
    config = DEFAULTED[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = saved_config(peft.get_peft_model(base_model(arch), peft_config(config)), tmp_path / "theirs")
    ours = saved_config(grafting.get_peft_model(base_model(arch), config), tmp_path / "ours")
    assert isinstance(ours["target_modules"], list)
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])
    assert config.target_modules is None  # the user's config is not changed


def test_peft_version_records_the_format_and_grafting_and_peft_reads_it_silently(tmp_path: Path) -> None:
    data = saved_config(grafting.get_peft_model(base_model("llama"), grafting.LoraConfig(r=2)), tmp_path)
    version = Version(data["peft_version"])
    assert version.public == peft.__version__ == grafting.config.adapter_config.PEFT_FORMAT_VERSION
    assert version.local == f"grafting.{grafting.__version__}"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT warns about keys it does not know
        loaded = peft.PeftConfig.from_pretrained(tmp_path)
        peft.PeftModel.from_pretrained(base_model("llama"), tmp_path)
    assert loaded.peft_version == data["peft_version"]
    assert sorted(loaded.target_modules) == ["q_proj", "v_proj"]


def test_a_peft_file_keeps_its_peft_version_when_grafting_saves_it_again(tmp_path: Path) -> None:
    peft.get_peft_model(base_model("llama"), peft.LoraConfig(r=2)).save_pretrained(tmp_path / "theirs")
    written = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    model = grafting.PeftModel.from_pretrained(base_model("llama"), tmp_path / "theirs")
    again = saved_config(model, tmp_path / "ours")
    assert again["peft_version"] == written["peft_version"] == peft.__version__
