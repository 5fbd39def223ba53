"""Small random models for tests of grafting and of third-party plugins.

Each builder makes a seeded, randomly initialized transformers model a few
kilobytes large, in eval mode, so plugin authors can check their method on
the same architectures the core is tested on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

ARCHITECTURES = ("llama", "gpt2", "bert", "t5")


def tiny_llama(seed: int = 0, hidden: int = 16, layers: int = 2) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0, hidden: int = 16, layers: int = 2) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=64, n_embd=hidden, n_layer=layers, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0, hidden: int = 16, layers: int = 2, num_labels: int = 3) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    options: dict[str, Any] = {"num_labels": num_labels}  # a PretrainedConfig option, not a BertConfig field
    config = BertConfig(
        vocab_size=64,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        **options,
    )
    return BertForSequenceClassification(config).eval()


def tiny_t5(seed: int = 0, hidden: int = 16, layers: int = 2) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    options: dict[str, Any] = {"decoder_start_token_id": 0, "pad_token_id": 0}
    config = T5Config(
        vocab_size=64,
        d_model=hidden,
        d_kv=hidden // 2,
        d_ff=2 * hidden,
        num_layers=layers,
        num_heads=2,
        **options,
    )
    return T5ForConditionalGeneration(config).eval()


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "bert": tiny_bert,
    "t5": tiny_t5,
}


def tiny_model(arch: str, seed: int = 0, **kwargs: int) -> nn.Module:
    """A tiny random model of ``arch`` (one of :data:`ARCHITECTURES`)."""
    return BUILDERS[arch](seed=seed, **kwargs)


def sample_inputs(arch: str, batch: int = 2, length: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword arguments for one forward pass of :func:`tiny_model` ``(arch)``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (batch, length), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if arch == "t5":
        inputs["decoder_input_ids"] = torch.randint(1, 64, (batch, max(2, length // 2)), generator=gen)
    return inputs


def model_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits of a forward pass, without gradients."""
    with torch.no_grad():
        return model(**inputs).logits
