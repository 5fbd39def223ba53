"""A script seeded once runs as with PEFT: building and loading adapters draw from torch's generator as PEFT's do.

PEFT draws each adapter's random initialisation from torch's global generator when ``get_peft_model``
builds it, and again when ``PeftModel.from_pretrained`` or ``load_adapter`` build one for the file to
overwrite. Everything a script draws afterwards (its batches, dropout masks) depends on that, so each
test runs one seeded script with PEFT and with grafting (build, train, save, load, train, load another)
and compares every loss.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch

import grafting
from grafting.testing import assert_close, tiny_llama

CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("LoraConfig", {"r": 4, "target_modules": ["q_proj", "v_proj"]}),
    "loha": ("LoHaConfig", {"r": 4, "target_modules": ["q_proj", "v_proj"]}),
    "ia3": ("IA3Config", {"target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
    "prompt_tuning": ("PromptTuningConfig", {"num_virtual_tokens": 3}),
    "p_tuning": ("PromptEncoderConfig", {"num_virtual_tokens": 3, "encoder_hidden_size": 8}),
    "prefix_tuning": ("PrefixTuningConfig", {"num_virtual_tokens": 3}),
    "adaption_prompt": ("AdaptionPromptConfig", {"adapter_len": 3, "adapter_layers": 1}),
    "vera": ("VeraConfig", {"r": 4, "target_modules": ["q_proj", "v_proj"]}),
}


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(4, 64, (2, 6))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def evaluate(model: Any, steps: int) -> list[float]:
    """Losses on ``steps`` batches drawn from torch's global generator, in training mode (dropout draws too)."""
    model.train()
    with torch.no_grad():
        return [model(**batch()).loss.item() for _ in range(steps)]


def train(model: Any, steps: int) -> list[float]:
    """``steps`` AdamW steps on batches drawn from torch's global generator; the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.05)
    losses = []
    for _ in range(steps):
        loss = model(**batch()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def seeded_script(library: Any, method: str, folder: Path) -> list[float]:
    """One script as a user writes it, with ``library`` (peft or grafting) behind its import line."""
    name, options = CONFIGS[method]
    bases = [tiny_llama(seed=0) for _ in range(2)]  # built (and seeded) before the script's own seed
    torch.manual_seed(1234)
    model = library.get_peft_model(bases[0], getattr(library, name)(task_type="CAUSAL_LM", **options))
    losses = train(model, 3)
    model.save_pretrained(folder)
    loaded = library.PeftModel.from_pretrained(bases[1], folder)
    losses += evaluate(loaded, 2)
    loaded.load_adapter(folder, "other")
    loaded.set_adapter("other")
    return losses + evaluate(loaded, 2)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_a_seeded_script_gives_peft_s_losses(method: str, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = seeded_script(peft, method, tmp_path / "peft")
    ours = seeded_script(grafting, method, tmp_path / "grafting")
    assert_close(torch.tensor(ours), torch.tensor(theirs))
    assert len(set(theirs)) > 1  # the batches differ: a generator out of step would change them
