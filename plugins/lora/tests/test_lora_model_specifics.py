"""LoRA on model-specific layers: scaled embeddings (Gemma 3) and default targets (DeBERTa), against PEFT."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lora_model_helpers import randomize
from torch import nn

import grafting
from grafting.testing import assert_close


def _tiny_gemma3() -> nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=64,
        sliding_window=8,
        tie_word_embeddings=False,  # merging into a tied embedding would change the output head too
    )
    return Gemma3ForCausalLM(config).eval()


def _ids() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**_ids()).logits


def _gemma_lora(base: nn.Module) -> Any:
    config = grafting.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    model = grafting.get_peft_model(base, config)
    randomize(model, 3)
    return model


def test_lora_on_gemma3_scaled_embedding_merges_to_its_unmerged_output() -> None:
    base = _tiny_gemma3().double()
    embedding = base.get_input_embeddings()
    assert float(embedding.embed_scale) == pytest.approx(4.0)  # sqrt(hidden): the scale the delta must get
    before = _logits(base)
    model = _gemma_lora(base)
    unmerged = _logits(model)
    model.merge_adapter()
    assert_close(_logits(model), unmerged, changed_from=before, msg="merged Gemma 3 LoRA")
    model.unmerge_adapter()
    assert_close(_logits(model), unmerged, changed_from=before, msg="unmerged again")


def test_lora_on_gemma3_scaled_embedding_matches_peft(tmp_path: Path) -> None:
    import peft

    base = _tiny_gemma3()
    theirs_base = copy.deepcopy(base)
    before = _logits(base)
    model = _gemma_lora(base)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(theirs_base, str(tmp_path))
    assert_close(_logits(model), _logits(theirs), changed_from=before, msg="PEFT's logits")


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("deberta", {"in_proj"}), ("deberta-v2", {"query_proj", "value_proj"})],
)
def test_deberta_default_targets_are_peft_s(kind: str, expected: set[str]) -> None:
    import peft
    from transformers import (
        DebertaConfig,
        DebertaForSequenceClassification,
        DebertaV2Config,
        DebertaV2ForSequenceClassification,
    )

    config_class, model_class = {
        "deberta": (DebertaConfig, DebertaForSequenceClassification),
        "deberta-v2": (DebertaV2Config, DebertaV2ForSequenceClassification),
    }[kind]
    torch.manual_seed(0)
    base = model_class(
        config_class(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    ).eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="SEQ_CLS"))
    ours = grafting.get_peft_model(base, grafting.LoraConfig(task_type="SEQ_CLS"))
    adapted = {name for name, m in ours.named_modules() if isinstance(m, grafting.AdaptedLayer)}
    peft_adapted = {name for name, m in theirs.named_modules() if hasattr(m, "lora_A")}
    assert adapted == peft_adapted
    assert {name.rsplit(".", 1)[-1] for name in adapted} == expected
