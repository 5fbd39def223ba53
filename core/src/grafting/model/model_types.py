"""What the core knows about transformers architectures: module names by ``model.config.model_type``.

Methods that adapt the attention's query and value projections by default
(LoRA, LoHa, as PEFT does) take their default targets from here.
"""

from __future__ import annotations

from typing import Any

_QV = ("q_proj", "v_proj")

#: The query and value projections of the attention, by model type.
QUERY_VALUE_PROJECTIONS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        [
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "opt",
            "bart",
            "mbart",
            "marian",
            "whisper",
            "starcoder2",
            "olmo",
            "olmo2",
            "granite",
            "cohere",
            "smollm3",
            "gptj",
            "gpt_neo",
        ],
        _QV,
    ),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ("c_attn",)),
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "layoutlm"], ("query", "value")),
    "deberta": ("in_proj",),  # DeBERTa (v1) projects queries, keys and values with one fused layer
    "deberta-v2": ("query_proj", "value_proj"),
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),  # PEFT's choice for Phi adds the MLP
    "phi3": ("qkv_proj",),  # fused query/key/value projection
    **dict.fromkeys(["t5", "mt5", "umt5"], ("q", "v")),
    **dict.fromkeys(["gpt_neox", "bloom", "falcon"], ("query_key_value",)),
    "distilbert": ("q_lin", "v_lin"),
}


def model_type(model: Any) -> str:
    """``model.config.model_type``, or ``""`` for models without a transformers config."""
    return str(getattr(getattr(model, "config", None), "model_type", "") or "")


def query_value_projections(model: Any) -> list[str] | None:
    """The names of ``model``'s attention query and value projections, if its type is known."""
    names = QUERY_VALUE_PROJECTIONS.get(model_type(model))
    return list(names) if names else None
