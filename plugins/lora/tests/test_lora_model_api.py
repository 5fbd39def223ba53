"""LoRA on a bfloat16 base against PEFT: the model API's dtype handling with the real method (the API itself
is tests/test_model_api.py, on toy methods)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lora_model_helpers import ARCHS, EMBEDDING, LINEAR, base_model, logits, lora, randomize

import grafting
from grafting.testing import assert_close


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("use_dora", [False, True])
def test_a_bfloat16_base_gives_peft_logits(arch: str, use_dora: bool, tmp_path: Path) -> None:
    """float32 adapters on a bfloat16 base with ``precision="adapter"``: the delta is computed and added in
    float32 and rounded once, as PEFT does (PEFT reads the file, ignoring the option it lacks)."""
    import peft

    config = lora(arch, target_modules=[*LINEAR[arch][:2], EMBEDDING[arch]] if not use_dora else "all-linear")
    options = {**_fields(config, use_dora), "precision": "adapter"}
    model = grafting.get_peft_model(base_model(arch).to(torch.bfloat16), lora(arch, **options))
    randomize(model, 2)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(base_model(arch).to(torch.bfloat16), str(tmp_path))
    base = logits(base_model(arch).to(torch.bfloat16), arch)
    assert_close(logits(model, arch), logits(theirs, arch), changed_from=base, msg="bfloat16 logits")
    loaded = grafting.PeftModel.from_pretrained(base_model(arch).to(torch.bfloat16), tmp_path)
    assert loaded.peft_config["default"].precision == "adapter"
    assert {p.dtype for n, p in loaded.named_parameters() if ".lora_" in n} == {torch.float32}
    assert_close(logits(loaded, arch), logits(model, arch), changed_from=base, msg="reloaded bfloat16 logits")


def _fields(config: Any, use_dora: bool) -> dict[str, Any]:
    return {"target_modules": config.target_modules, "use_dora": use_dora}


def _fields(config: Any, use_dora: bool) -> dict[str, Any]:
    return {"target_modules": config.target_modules, "use_dora": use_dora}
