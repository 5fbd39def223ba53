"""LoraConfig: the options of LoRA, DoRA and rsLoRA, as PEFT writes them."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from grafting import AdapterConfig, ConfigError
from grafting.toolkit import (
    RankAlphaPatterns,
    boolean,
    one_of,
    pattern_of,
    positive,
    positive_int,
    probability,
    trainable_biases,
)


@attrs.define(kw_only=True)
class LoraConfig(RankAlphaPatterns, AdapterConfig):
    """Low-rank adaptation: ``ΔW = B·A · lora_alpha / r`` (rsLoRA: ``/ √r``).

    ``rank_pattern`` and ``alpha_pattern`` override ``r`` and ``lora_alpha``
    for modules whose name matches a key (a regex matched as a dotted suffix).
    ``bias`` trains no bias (``"none"``), every bias (``"all"``) or the biases
    of adapted layers (``"lora_only"``).
    """

    peft_type: ClassVar[str] = "LORA"
    alpha_option: ClassVar[str] = "lora_alpha"
    absent_in_peft: ClassVar[tuple[str, ...]] = (*AdapterConfig.absent_in_peft, "precision")
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
    fan_in_fan_out: bool = attrs.field(default=False, validator=boolean)
    bias: str = attrs.field(default="none", validator=one_of("none", "all", "lora_only"))
    use_rslora: bool = attrs.field(default=False, validator=boolean)
    init_lora_weights: bool | str = attrs.field(default=True)
    rank_pattern: dict[str, int] = attrs.field(factory=dict, validator=pattern_of(positive_int))
    alpha_pattern: dict[str, float] = attrs.field(factory=dict, validator=pattern_of(positive))
    use_dora: bool = attrs.field(default=False, validator=boolean)
    lora_bias: bool = attrs.field(default=False, validator=boolean)
    #: grafting's own: ``None``/``"input"`` runs a float32 adapter on a bf16/fp16 base in the base's
    #: dtype (tensor cores, as autocast would); ``"adapter"`` in float32, PEFT's numerics. Written
    #: to adapter_config.json only when set.
    precision: str | None = attrs.field(default=None, validator=one_of(None, "input", "adapter"))

    @init_lora_weights.validator
    def _check_init(self, attribute: attrs.Attribute, value: Any) -> None:
        if not (value is True or value is False or (isinstance(value, str) and value == "gaussian")):
            raise ConfigError(
                f"LoraConfig.init_lora_weights must be True, False or 'gaussian', got {value!r}"
                " (PEFT's data-driven initializations such as 'pissa' or 'loftq' are not implemented)"
            )

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.lora_bias and self.use_dora:
            raise ConfigError("LoraConfig: lora_bias=True does not combine with use_dora=True (PEFT refuses it too)")
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise ConfigError(
                f"LoraConfig: lora_bias=True needs init_lora_weights True or False, got {self.init_lora_weights!r}"
                " (PEFT refuses it too)"
            )

    def scaling_for(self, module_name: str, *, rank_stabilized: bool | None = None) -> float:
        """``lora_alpha / r`` for the module (``/ √r`` with ``use_rslora``)."""
        stabilized = self.use_rslora if rank_stabilized is None else rank_stabilized
        return super().scaling_for(module_name, rank_stabilized=stabilized)

    def trainable_base_parameters(self, model: Any, adapted_paths: list[str]) -> list[str]:
        return trainable_biases(model, adapted_paths, self.bias)
