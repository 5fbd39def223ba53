"""The grafting plugin for LoHa: declares the method and builds its layer adapters."""

from __future__ import annotations

from torch import nn

from grafting import Method, hookimpl
from grafting_loha.config import LoHaConfig
from grafting_loha.layers import LoHaConv, LoHaLinear

_QV = ("q_proj", "v_proj")

#: Modules LoHa adapts by default, by ``model.config.model_type`` (PEFT uses LoRA's table for LoHa).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
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
            "phi3",
            "phi",
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
    **dict.fromkeys(
        ["bert", "roberta", "xlm-roberta", "electra", "deberta", "deberta-v2", "layoutlm"], ("query", "value")
    ),
    **dict.fromkeys(["t5", "mt5", "umt5"], ("q", "v")),
    **dict.fromkeys(["gpt_neox", "bloom", "falcon"], ("query_key_value",)),
    "distilbert": ("q_lin", "v_lin"),
}


@hookimpl
def grafting_methods() -> list[Method]:
    return [
        Method(peft_type="LOHA", name="loha", config_class=LoHaConfig, description="Low-rank Hadamard product (LoHa)")
    ]


@hookimpl
def grafting_default_target_modules(config: object, model: nn.Module) -> list[str] | None:
    if not isinstance(config, LoHaConfig):
        return None
    targets = DEFAULT_TARGETS.get(getattr(getattr(model, "config", None), "model_type", ""))
    return list(targets) if targets else None


@hookimpl
def grafting_create_layer_adapter(
    config: object, base_layer: nn.Module, adapter_name: str, module_name: str
) -> nn.Module | None:
    if not isinstance(config, LoHaConfig):
        return None
    r, scaling = config.rank_for(module_name), config.scaling_for(module_name)
    options = {
        "rank_dropout": config.rank_dropout,
        "module_dropout": config.module_dropout,
        "init_weights": config.init_weights,
    }
    if isinstance(base_layer, nn.Linear):
        return LoHaLinear(base_layer, r, scaling, **options)
    if isinstance(base_layer, (nn.Conv1d, nn.Conv2d)):
        return LoHaConv(base_layer, r, scaling, effective=config.use_effective_conv2d, **options)
    return None
