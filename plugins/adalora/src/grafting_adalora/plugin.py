"""The grafting plugin for AdaLoRA: declares the method, builds its rank allocator and layer adapters."""

from __future__ import annotations

from torch import nn

from grafting import ConfigError, Method, hookimpl
from grafting.toolkit import default_targets, is_linear, warn_fan_in_fan_out
from grafting_adalora.allocator import RankAllocator
from grafting_adalora.config import AdaLoraConfig
from grafting_adalora.layers import AdaLoraAdapter

#: The modules AdaLoRA adapts when ``target_modules`` is None, by model type (PEFT's defaults).
QV = ("q_proj", "v_proj")
SEQ2SEQ = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    **{name: QV for name in ("llama", "llama4", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3", "gptj", "gpt_neo")},
    **{name: ("c_attn",) for name in ("gpt2", "gpt_bigcode")},
    **{name: ("query_key_value",) for name in ("bloom", "gpt_neox")},
    **{name: SEQ2SEQ for name in ("bart", "opt")},
    "t5": ("q", "k", "v", "o", "wi", "wo"),
    "mt5": ("q", "k", "v", "o", "wi_0", "wi_1", "wo"),
    "bert": ("query", "value"),
    "roberta": ("query", "key", "value", "dense"),
    "deberta-v2": ("query_proj", "key_proj", "value_proj", "dense"),
    "deberta": ("in_proj",),
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"),
}


@hookimpl
def grafting_methods() -> list[Method]:
    return [
        Method(
            peft_type="ADALORA",
            name="adalora",
            config_class=AdaLoraConfig,
            description="Adaptive low-rank adaptation (AdaLoRA): SVD-form LoRA with ranks allocated in training",
        )
    ]


@hookimpl
def grafting_default_target_modules(model: nn.Module) -> list[str] | None:
    return default_targets(DEFAULT_TARGETS, model)


@hookimpl
def grafting_create_shared_state(config: AdaLoraConfig, model: nn.Module, adapter_name: str) -> RankAllocator:
    """The allocator; refuses a second trainable AdaLoRA adapter on the model (one allocation at a time, as PEFT)."""
    trained = (m.shared.config for m in model.modules() if isinstance(m, AdaLoraAdapter) and m.shared is not None)
    if not config.inference_mode and any(not other.inference_mode for other in trained):  # type: ignore[attr-defined]
        raise ConfigError(
            f"AdaLoRA adapter {adapter_name!r}: the model already holds a trainable AdaLoRA adapter and AdaLoRA"
            " trains one at a time; add this one with inference_mode=True (or load it with is_trainable=False)"
        )
    return RankAllocator(config)


@hookimpl
def grafting_create_layer_adapter(
    config: AdaLoraConfig, base_layer: nn.Module, module_name: str, shared: RankAllocator
) -> AdaLoraAdapter | None:
    if not (is_linear(base_layer) or (isinstance(base_layer, nn.Conv2d) and base_layer.groups == 1)):
        return None
    warn_fan_in_fan_out(config, base_layer)
    adapter = AdaLoraAdapter(
        base_layer,
        r=config.rank_of(module_name),
        init_r=config.init_r,
        scaling=float(config.lora_alpha),
        dropout=config.lora_dropout,
        init_weights=config.init_lora_weights,
    )
    adapter.use_shared(shared)
    return adapter


@hookimpl
def grafting_check_saved_shapes(config: AdaLoraConfig, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Each layer's lora_A rows, lora_B columns and lora_E entries agree with its rank (``rank_pattern``/``init_r``)."""
    problems = []
    for key, shape in shapes.items():
        if not key.endswith(".lora_E"):
            continue
        stem, r = key.removesuffix("lora_E"), shape[0]
        expected = config.rank_of(stem.removeprefix("base_model.model.").removesuffix("."))
        found = {"lora_E": r, "lora_A": shapes.get(stem + "lora_A", (None,))[0]}
        found["lora_B"] = shapes.get(stem + "lora_B", (None, None))[-1]
        problems += [f"{stem}{f}: rank {n}, the config says {expected}" for f, n in found.items() if n != expected]
    return problems
