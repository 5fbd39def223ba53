"""AdaLoraConfig: the options of AdaLoRA, as PEFT writes them (LoRA's shared ones included)."""

from __future__ import annotations

import numbers
import warnings
from typing import Any, ClassVar

import attrs
import torch

from grafting import AdapterConfig, ConfigError, GraftingWarning
from grafting.toolkit import boolean, check_count, one_of, positive, positive_int, probability, trainable_biases

#: PEFT's LoRA options that AdaLoRA inherits but grafting's AdaLoRA does not implement, with PEFT's default.
_LORA_INERT: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "kasa_config": None,
    "layer_replication": None,
    "loftq_config": {},
    "lora_bias": False,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "monteclora_config": None,
    "qalora_group_size": 16,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "use_rslora": False,
    "velora_config": None,
}
_FACTORS = ("lora_A", "lora_B", "lora_E")


def _count(minimum: int) -> Any:
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        check_count(value, f"{type(instance).__name__}.{attribute.name}", minimum=minimum)

    return check


def _open_unit(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) < 1.0:
        raise ConfigError(f"AdaLoraConfig.{attribute.name} must be in (0, 1), got {value!r}")


def _non_negative(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value == 0 and not isinstance(value, bool):
        return
    positive(instance, attribute, value)


def _check_rank_pattern(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(b, bool) for b in v) for k, v in value.items()
    ):
        raise ConfigError(
            "AdaLoraConfig.rank_pattern must map '<module>.lora_E' to a list of booleans (the ranks kept),"
            f" got {str(value)[:200]}"
        )


@attrs.define(kw_only=True)
class AdaLoraConfig(AdapterConfig):
    """AdaLoRA: ``ΔW = B·(A ⊙ E) · lora_alpha / ranknum`` with ranks pruned while training.

    Every target starts with ``init_r`` ranks (``ranknum``). After ``tinit`` steps the rank
    budget falls on a cubic schedule to ``target_r`` per layer on average at step
    ``total_step - tfinal``; every ``deltaT`` steps ``update_and_allocate`` zeroes the singular
    values ``E`` of the least important ranks (sensitivity ``|p·∇p|`` smoothed with ``beta1``,
    its uncertainty with ``beta2``). The final allocation is kept in ``rank_pattern``
    (``{"<module>.lora_E": [kept, ...]}``); a saved adapter holds only the kept ranks.
    ``orth_reg_weight`` weights the regulariser ``mean ‖AAᵀ − I‖, ‖BᵀB − I‖`` added to the loss.
    ``r`` is not used (PEFT's too): ``init_r`` is the rank.
    """

    peft_type: ClassVar[str] = "ADALORA"
    inert_keys: ClassVar[dict[str, Any]] = _LORA_INERT

    r: int = attrs.field(default=8, validator=positive_int)
    lora_alpha: float = attrs.field(default=8, validator=positive)
    lora_dropout: float = attrs.field(default=0.0, validator=probability)
    fan_in_fan_out: bool = attrs.field(default=False, validator=boolean)
    bias: str = attrs.field(default="none", validator=one_of("none", "all", "lora_only"))
    init_lora_weights: bool = attrs.field(default=True, validator=boolean)
    target_r: int = attrs.field(default=8, validator=_count(0))
    init_r: int = attrs.field(default=12, validator=positive_int)
    tinit: int = attrs.field(default=0, validator=_count(0))
    tfinal: int = attrs.field(default=0, validator=_count(0))
    deltaT: int = attrs.field(default=1, validator=positive_int)
    beta1: float = attrs.field(default=0.85, validator=_open_unit)
    beta2: float = attrs.field(default=0.85, validator=_open_unit)
    orth_reg_weight: float = attrs.field(default=0.5, validator=_non_negative)
    total_step: int | None = attrs.field(default=None)
    rank_pattern: dict[str, list[bool]] | None = attrs.field(default=None, validator=_check_rank_pattern)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.total_step is None:
            raise ConfigError(
                "AdaLoraConfig.total_step must be set: AdaLoRA schedules its ranks over the training steps"
            )
        check_count(self.total_step, "AdaLoraConfig.total_step")
        if self.tinit >= self.total_step - self.tfinal:
            raise ConfigError(
                f"AdaLoraConfig: tinit={self.tinit} must be below total_step - tfinal ="
                f" {self.total_step - self.tfinal}, or no step is left to allocate the ranks"
            )
        if self.r != 8:
            warnings.warn("AdaLoraConfig.r is not used; init_r sets the initial rank", GraftingWarning, stacklevel=3)

    def rank_of(self, module_name: str) -> int:
        """The number of ranks ``module_name`` holds: ``init_r``, or those ``rank_pattern`` keeps."""
        kept = (self.rank_pattern or {}).get(f"{module_name}.lora_E")
        return self.init_r if kept is None else sum(kept)

    def tensors_to_save(self, tensors: dict[str, Any]) -> dict[str, Any]:
        """Only the ranks ``rank_pattern`` keeps, as PEFT saves them (an adapter already pruned is saved as is)."""
        if not self.rank_pattern:
            return tensors
        out = dict(tensors)
        for module, kept in self.rank_pattern.items():
            stem = module.removesuffix("lora_E")
            mask = torch.tensor(kept, dtype=torch.bool)
            for key, value in tensors.items():
                factor = next((f for f in _FACTORS if key.endswith("." + stem + f)), None)
                if factor is None:
                    continue
                dim = 1 if factor == "lora_B" else 0
                if value.shape[dim] == len(kept) != int(mask.sum()):
                    out[key] = value.index_select(dim, mask.nonzero().view(-1).to(value.device))
        return out

    def trainable_base_parameters(self, model: Any, adapted_paths: list[str]) -> list[str]:
        return trainable_biases(model, adapted_paths, self.bias)
