"""Build each method's adapter from its (model-completed) config."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from grafting import ConfigError, GraftingWarning
from grafting_prefix import calls
from grafting_prefix.config import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from grafting_prefix.encoders import LSTMPromptEncoder, MLPPromptEncoder, PrefixProjection, PromptTable
from grafting_prefix.prefix import PrefixAdapter
from grafting_prefix.prompt import PromptAdapter


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _dims(config: PromptTuningConfig | PromptEncoderConfig | PrefixTuningConfig) -> tuple[int, int]:
    assert config.num_virtual_tokens is not None
    assert config.token_dim is not None
    return config.num_virtual_tokens * (config.num_transformer_submodules or 1), config.token_dim


def prompt_tuning(config: PromptTuningConfig, model: nn.Module) -> PromptAdapter:
    rows, width = _dims(config)
    table = PromptTable(rows, width)
    if not config.inference_mode and not table.embedding.weight.is_meta:
        ids = _initial_token_ids(config, model, rows)
        if ids is not None:
            embeddings = calls.input_embeddings(model)
            with torch.no_grad():
                ids = ids.to(_device(embeddings))
                table.embedding.weight.copy_(embeddings(ids).float())
    task = config.task_type or ""
    return PromptAdapter(
        table,
        method="prompt tuning",
        task_type=task,
        virtual=config.num_virtual_tokens or 0,
        rows=rows,
        width=width,
        device=_device(model),
    )


def _initial_token_ids(config: PromptTuningConfig, model: nn.Module, rows: int) -> torch.Tensor | None:
    """Token ids whose embeddings start the prompt, or ``None`` for a random start."""
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        vocabulary = calls.vocabulary_size(model)
        return torch.randint(0, vocabulary, (rows,))
    if config.prompt_tuning_init != "TEXT":
        return None
    ids = _tokenize(config)
    if not ids:
        raise ConfigError(
            f"PromptTuningConfig: prompt_tuning_init_text {config.prompt_tuning_init_text!r} has no tokens"
        )
    ids = (ids * -(-rows // len(ids)))[:rows]  # repeated, then cut to length
    return torch.tensor(ids, dtype=torch.long)


def _tokenize(config: PromptTuningConfig) -> list[int]:
    from transformers import AutoTokenizer

    options = dict(config.tokenizer_kwargs or {})
    if options.pop("trust_remote_code", None):
        warnings.warn(
            "PromptTuningConfig.tokenizer_kwargs: trust_remote_code is ignored; grafting runs no remote code",
            GraftingWarning,
            stacklevel=3,
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **options)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"PromptTuningConfig: cannot load the tokenizer {config.tokenizer_name_or_path!r} for"
            f" prompt_tuning_init='TEXT': {exc}"
        ) from None
    return list(tokenizer(config.prompt_tuning_init_text)["input_ids"])


def p_tuning(config: PromptEncoderConfig, model: nn.Module) -> PromptAdapter:
    rows, width = _dims(config)
    hidden = config.encoder_hidden_size or width
    encoder: nn.Module
    if config.inference_mode:  # it will be loaded: PEFT's format holds the encoded tokens only
        encoder = PromptTable(rows, width)
    elif config.encoder_reparameterization_type == "LSTM":
        encoder = LSTMPromptEncoder(rows, width, hidden, config.encoder_num_layers, config.encoder_dropout)
    else:
        encoder = MLPPromptEncoder(rows, width, hidden)
    task = config.task_type or ""
    return PromptAdapter(
        encoder,
        method="P-tuning",
        task_type=task,
        virtual=config.num_virtual_tokens or 0,
        rows=rows,
        width=width,
        device=_device(model),
    )


def prefix_tuning(config: PrefixTuningConfig, model: nn.Module) -> PrefixAdapter:
    assert config.num_layers is not None
    assert config.num_attention_heads is not None
    rows, width = config.num_virtual_tokens or 0, config.token_dim or 0
    heads = config.num_attention_heads
    out = config.num_layers * 2 * width
    zero = config.init_weights == "zero"
    encoder: nn.Module
    if config.prefix_projection and not config.inference_mode:
        encoder = PrefixProjection(rows, width, config.encoder_hidden_size or width, out, zero)
    else:
        encoder = PromptTable(rows, out)
        if zero:
            nn.init.zeros_(encoder.embedding.weight)
    return PrefixAdapter(
        encoder,
        layers=config.num_layers,
        heads=heads,
        head_dim=width // heads,
        rows=rows,
        device=_device(model),
        task_type=config.task_type or "",
        submodules=config.num_transformer_submodules or 1,
    )
