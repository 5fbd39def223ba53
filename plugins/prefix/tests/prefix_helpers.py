"""Shared pieces of the virtual-token plugin's tests: configs of both libraries, a decoding oracle."""

from __future__ import annotations

from typing import Any

import peft
import torch
from torch import nn

import grafting_prefix
from grafting.testing import assert_close

#: grafting's and PEFT's config class for each method.
CONFIGS: dict[str, tuple[type, type]] = {
    "prompt": (grafting_prefix.PromptTuningConfig, peft.PromptTuningConfig),
    "p_mlp": (grafting_prefix.PromptEncoderConfig, peft.PromptEncoderConfig),
    "p_lstm": (grafting_prefix.PromptEncoderConfig, peft.PromptEncoderConfig),
    "prefix": (grafting_prefix.PrefixTuningConfig, peft.PrefixTuningConfig),
    "prefix_proj": (grafting_prefix.PrefixTuningConfig, peft.PrefixTuningConfig),
}
#: Options per method besides num_virtual_tokens and task_type (small encoders, to keep tests fast).
OPTIONS: dict[str, dict[str, Any]] = {
    "prompt": {},
    "p_mlp": {"encoder_hidden_size": 8},
    "p_lstm": {"encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 8, "encoder_num_layers": 1},
    "prefix": {},
    "prefix_proj": {"prefix_projection": True, "encoder_hidden_size": 12},
}


def configs(method: str, task_type: str = "CAUSAL_LM", n: int = 3, **extra: Any) -> tuple[Any, Any]:
    """(grafting config, PEFT config) of ``method`` with the same options."""
    ours, theirs = CONFIGS[method]
    options = {"task_type": task_type, "num_virtual_tokens": n, **OPTIONS[method], **extra}
    return ours(**options), theirs(**options)


def adapter_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model-level adapters' parameters, by name."""
    return {n: p for n, p in model.named_parameters() if ".model_adapters." in n}


def greedy_reference(model: nn.Module, input_ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by a full forward pass per step (no cache): the oracle for generate.

    Once a row emits the end-of-sequence token it is padded with it, as
    transformers does when no pad token is set.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    eos = base.generation_config.eos_token_id
    pad = base.generation_config.pad_token_id
    pad = eos if pad is None else pad
    out, done = input_ids, torch.zeros(input_ids.shape[0], dtype=torch.bool)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=out, attention_mask=torch.ones_like(out)).logits
        nxt = logits[:, -1].argmax(-1)
        if eos is not None:
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            done = done | (nxt == eos)
        out = torch.cat([out, nxt[:, None]], dim=1)
    return out


def train_steps(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, steps: int = 3) -> None:
    """A few SGD steps on the model's loss, with every trainable parameter."""
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
    model.eval()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_prompted(actual: torch.Tensor, expected: torch.Tensor, plain: torch.Tensor, msg: str) -> None:
    """``actual`` is ``expected`` up to rounding, and the prompts moved the last position away from ``plain``
    (a causal LM's prompted logits hold N more positions than the base model's)."""
    assert_close(actual, expected, msg=msg)
    assert_close(actual[:, -1], expected[:, -1], changed_from=plain[:, -1], msg=f"{msg}, last position")
