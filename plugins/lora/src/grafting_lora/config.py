"""LoraConfig: the options of LoRA, DoRA and rsLoRA, as PEFT writes them."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import attrs

from grafting.config import AdapterConfig, one_of, positive, positive_int, probability
from grafting.errors import ConfigError
from grafting.matching import pattern_value

#: Parameters inside grafting's wrappers that are not base biases: adapters, and both sides of a
#: modules_to_save wrapper (its copies train in full; the original stays frozen, as in PEFT).
_WRAPPER_PARTS = ("adapters", "modules_to_save", "original_module")


@attrs.define(kw_only=True)
class LoraConfig(AdapterConfig):
    """Low-rank adaptation: ``ΔW = B·A · lora_alpha / r`` (rsLoRA: ``/ √r``).

    ``rank_pattern`` and ``alpha_pattern`` override ``r`` and ``lora_alpha``
    for modules whose name matches a key (a regex matched as a dotted suffix).
    ``bias`` trains no bias (``"none"``), every bias (``"all"``) or the biases
    of adapted layers (``"lora_only"``).
    """

    peft_type: ClassVar[str] = "LORA"
    inert_keys: ClassVar[dict[str, Any]] = {
        "alora_invocation_tokens": None,
        "arrow_config": None,
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "kasa_config": None,
        "layer_replication": None,
        "loftq_config": {},
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "monteclora_config": None,
        "qalora_group_size": 16,
        "target_parameters": None,
        "trainable_token_indices": None,
        "use_bdlora": None,
        "use_qalora": False,
        "velora_config": None,
    }

    r: int = attrs.field(default=8, validator=positive_int)
    lora_alpha: float = attrs.field(default=8, validator=positive)
    lora_dropout: float = attrs.field(default=0.0, validator=probability)
    fan_in_fan_out: bool = False
    bias: str = attrs.field(default="none", validator=one_of("none", "all", "lora_only"))
    use_rslora: bool = False
    init_lora_weights: bool | str = attrs.field(default=True)
    rank_pattern: dict[str, int] = attrs.field(factory=dict)
    alpha_pattern: dict[str, float] = attrs.field(factory=dict)
    use_dora: bool = False
    lora_bias: bool = False

    @init_lora_weights.validator
    def _check_init(self, attribute: attrs.Attribute, value: Any) -> None:
        if not (value is True or value is False or value == "gaussian"):
            raise ConfigError(
                f"LoraConfig.init_lora_weights must be True, False or 'gaussian', got {value!r}"
                " (PEFT's data-driven initializations such as 'pissa' or 'loftq' are not implemented)"
            )

    @rank_pattern.validator
    def _check_ranks(self, attribute: attrs.Attribute, value: dict[str, int]) -> None:
        if not isinstance(value, dict):
            raise ConfigError(f"LoraConfig.rank_pattern must be a dict of module pattern to rank, got {value!r}")
        for key, rank in value.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise ConfigError(f"LoraConfig.rank_pattern[{key!r}] must be a positive int, got {rank!r}")

    @alpha_pattern.validator
    def _check_alphas(self, attribute: attrs.Attribute, value: dict[str, float]) -> None:
        if not isinstance(value, dict):
            raise ConfigError(f"LoraConfig.alpha_pattern must be a dict of module pattern to alpha, got {value!r}")
        for key, alpha in value.items():
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
                raise ConfigError(f"LoraConfig.alpha_pattern[{key!r}] must be a number > 0, got {alpha!r}")

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.lora_bias and self.use_dora:
            raise ConfigError("LoraConfig: lora_bias=True does not combine with use_dora=True (PEFT refuses it too)")
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise ConfigError(
                f"LoraConfig: lora_bias=True needs init_lora_weights True or False, got {self.init_lora_weights!r}"
                " (PEFT refuses it too)"
            )

    def rank_for(self, module_name: str) -> int:
        return pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.lora_alpha)

    def scaling_for(self, module_name: str) -> float:
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def trainable_base_parameters(self, model: Any, adapted_paths: list[str]) -> list[str]:
        if self.bias == "none":
            return []
        if self.bias == "lora_only":
            return [
                f"{p}.base_layer.bias"
                for p in adapted_paths
                if getattr(model.get_submodule(p).base_layer, "bias", None) is not None
            ]
        return [
            n
            for n, _ in model.named_parameters()
            if n.endswith("bias") and not any(f".{part}." in n for part in _WRAPPER_PARTS)
        ]
