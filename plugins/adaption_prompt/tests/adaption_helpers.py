"""Shared pieces of the adaption prompt tests: tiny models, non-trivial adapters, the PEFT oracle."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from grafting.testing import model_output, sample_inputs, tiny_gpt2

ARCHS = ("llama", "mistral", "gpt2")
ATTENTION = {"llama": "self_attn", "mistral": "self_attn", "gpt2": "attn"}


def tiny(arch: str, seed: int = 0, layers: int = 3, **options: Any) -> nn.Module:
    """A tiny seeded model; Llama and Mistral with 4 query heads over 2 key/value heads (grouped)."""
    if arch == "gpt2":
        return tiny_gpt2(seed=seed, layers=layers)
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    config = config_class(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **options,
    )
    return model_class(config).eval()


def inputs(arch: str, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    return sample_inputs("gpt2" if arch == "gpt2" else "llama", batch=batch, length=6, seed=seed)


def logits(model: nn.Module, arch: str, **kwargs: Any) -> torch.Tensor:
    return model_output(model, {**inputs(arch), **kwargs})


def prompt_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every ``adaption_prompt``/``adaption_gate`` parameter of a grafting or PEFT model, by name."""
    return {n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1].startswith("adaption_")}


@torch.no_grad()
def open_gates(model: nn.Module, seed: int = 0) -> None:
    """Gates to random values in [0.5, 1.5) and fresh prompts, so every adapter does something."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(prompt_parameters(model).items()):
        if name.endswith("adaption_gate"):
            p.copy_(0.5 + torch.rand(p.shape, generator=gen))
        else:
            p.copy_(torch.randn(p.shape, generator=gen))


def greedy(model: nn.Module, arch: str, new_tokens: int = 6) -> torch.Tensor:
    """Greedy generation from two prompts, the first left-padded."""
    ids = inputs(arch, batch=2, seed=5)["input_ids"]
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )


def peft_adaption_prompt(model: nn.Module, **options: Any) -> Any:
    """PEFT's AdaptionPrompt on ``model`` (the oracle)."""
    import peft

    options.setdefault("task_type", "CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.AdaptionPromptConfig(**options))
