"""LoraConfig: the options of LoRA, DoRA and rsLoRA, as PEFT writes them."""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import attrs
import torch

from grafting import AdapterConfig, ConfigError, GraftingWarning
from grafting.toolkit import (
    RankAlphaPatterns,
    boolean,
    candidate_modules,
    name_matches,
    one_of,
    pattern_of,
    positive,
    positive_int,
    probability,
    trainable_biases,
)
from grafting_lora.init import check_init
from grafting_lora.init_configs import CordaConfig, EvaConfig, LoftQConfig, sub_config
from grafting_lora.parameters import parameter_plan
from grafting_lora.trainable_tokens import TokenPlan, check_weight_tying, token_plan


def _loftq_dict(value: Any) -> dict[str, Any]:
    """A LoftQConfig or its dict, validated, as the dict PEFT keeps (``{}`` when unset)."""
    if value is None or value == {}:
        return {}
    return attrs.asdict(sub_config(LoftQConfig, value, "LoraConfig.loftq_config"))  # type: ignore[arg-type]


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
        "kasa_config": None,
        "layer_replication": None,
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "monteclora_config": None,
        "qalora_group_size": 16,
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
    trainable_token_indices: list[int] | dict[str, list[int]] | None = attrs.field(default=None)
    target_parameters: list[str] | None = attrs.field(default=None)
    ensure_weight_tying: bool = attrs.field(default=False, validator=boolean)
    #: LoftQ's options as PEFT saves them: a dict (``{}`` unless ``init_lora_weights="loftq"``).
    loftq_config: dict[str, Any] = attrs.field(factory=dict, converter=lambda v: _loftq_dict(v))
    eva_config: EvaConfig | None = attrs.field(
        default=None, converter=lambda v: sub_config(EvaConfig, v, "LoraConfig.eva_config")
    )
    corda_config: CordaConfig | None = attrs.field(
        default=None, converter=lambda v: sub_config(CordaConfig, v, "LoraConfig.corda_config")
    )

    @target_parameters.validator
    def _check_parameters(self, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None and (not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value)):
            raise ConfigError(f"LoraConfig.target_parameters must be a list of parameter names, got {value!r}")

    @trainable_token_indices.validator
    def _check_tokens(self, attribute: attrs.Attribute, value: Any) -> None:
        if value is None:
            return
        groups = value.items() if isinstance(value, dict) else [(None, value)]
        for key, ids in groups:
            where = "LoraConfig.trainable_token_indices" + (f"[{key!r}]" if key is not None else "")
            if not isinstance(ids, (list, tuple)) or not ids:
                raise ConfigError(f"{where} must be a non-empty list of token ids, got {ids!r}")
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
                raise ConfigError(f"{where} must hold token ids (ints >= 0), got {ids!r}")
            if len(set(ids)) != len(ids):
                raise ConfigError(f"{where} lists a token id twice: {ids!r}")

    @init_lora_weights.validator
    def _check_init(self, attribute: attrs.Attribute, value: Any) -> None:
        check_init(value)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.lora_bias and self.use_dora:
            raise ConfigError(
                "LoraConfig: The argument lora_bias=True is not supported for DoRA, please pass use_dora=False"
                " (or lora_bias=False: the two do not combine)"
            )
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise ConfigError(
                "LoraConfig: The argument lora_bias=True is only supported with init_lora_weights=True or False,"
                f" got init_lora_weights={self.init_lora_weights} instead. (lora_bias needs the plain"
                f" initialization; {self.init_lora_weights!r} is not)"
            )
        self._check_init_options()

    def _check_init_options(self) -> None:
        """Each initialization's options go with it, as in PEFT (which warns and drops a stray loftq_config)."""
        init = self.init_lora_weights
        if init == "loftq" and not self.loftq_config:
            raise ConfigError("LoraConfig.loftq_config must be set (a LoftQConfig) when init_lora_weights='loftq'")
        if init != "loftq" and self.loftq_config:
            warnings.warn("LoraConfig.loftq_config is ignored unless init_lora_weights='loftq'", GraftingWarning, 4)
            self.loftq_config = {}
        for name, option, cls in (("eva", "eva_config", EvaConfig), ("corda", "corda_config", CordaConfig)):
            if init == name and getattr(self, option) is None:
                warnings.warn(
                    f"LoraConfig: init_lora_weights={name!r} without {option}; using the default {cls.__name__}",
                    GraftingWarning,
                    4,
                )
                setattr(self, option, cls())
            elif init != name and getattr(self, option) is not None:
                warnings.warn(f"LoraConfig.{option} is ignored unless init_lora_weights={name!r}", GraftingWarning, 4)

    def ties_weights(self) -> bool:
        return self.ensure_weight_tying

    def trains_token_rows(self) -> bool:
        return self.trainable_token_indices is not None

    def token_plan(self, model: Any) -> TokenPlan:
        """Where ``trainable_token_indices`` puts trainable rows on ``model`` (empty when unset)."""
        if self.trainable_token_indices is None:
            return TokenPlan(own={}, tied={})
        return token_plan(self.trainable_token_indices, model, ensure_tying=self.ensure_weight_tying)

    def validate_for_model(self, model: Any) -> None:
        super().validate_for_model(model)
        if self.ensure_weight_tying:
            check_weight_tying(self, model)
        plan = self.token_plan(model)
        for path in sorted(plan.own):
            if name_matches(path, self.modules_to_save):
                raise ConfigError(
                    f"LoraConfig: {path} is in both modules_to_save and trainable_token_indices; train it one way"
                )

    def parameter_plan(self, model: Any) -> dict[str, list[str]]:
        """Module path -> its parameters that ``target_parameters`` adapts (empty when unset)."""
        return parameter_plan(self.target_parameters, model) if self.target_parameters else {}

    def select_targets(self, model: Any, names: list[str]) -> list[str]:
        """The matched modules, plus the embeddings that carry trainable tokens and the modules whose
        parameters ``target_parameters`` names, in model order."""
        extra = {
            "trainable_token_indices": self.token_plan(model).paths,
            "target_parameters": set(self.parameter_plan(model)),
        }
        for option, paths in extra.items():
            both = sorted(set(names) & paths)
            if both:
                raise ConfigError(
                    f"LoraConfig: {both} are matched by target_modules and by {option}; adapt each module one way"
                )
        added = extra["trainable_token_indices"] | extra["target_parameters"]
        if not added:
            return names
        order = {n: i for i, (n, _) in enumerate(candidate_modules(model))}
        return sorted({*names, *added}, key=order.__getitem__)

    def as_update_of_base(self, tensors: dict[str, Any], initial: dict[str, Any]) -> tuple[LoraConfig, dict[str, Any]]:
        """PiSSA/OLoRA after training as plain LoRA on the original weight (PEFT's conversion).

        ``W_res + s·B·A = W + s·(B·A − B₀·A₀) = W + s·[B | −B₀]·[A ; A₀]``: rank and alpha
        double (rsLoRA: alpha × √2), so the scaling stays; the other tensors are kept.
        """
        if self.use_dora:
            raise ConfigError("LoraConfig: a DoRA adapter cannot be converted to plain LoRA against its initial state")
        if self.use_rslora and (self.rank_pattern or self.alpha_pattern):
            raise ConfigError(
                "LoraConfig: converting against the initial adapter does not support use_rslora together with"
                " rank_pattern or alpha_pattern (PEFT refuses it too)"
            )
        out: dict[str, Any] = {}
        for key, value in tensors.items():
            a_side = key.endswith((".lora_A.weight", ".lora_embedding_A"))
            b_side = key.endswith((".lora_B.weight", ".lora_embedding_B"))
            if (a_side or b_side) and key not in initial:
                raise ConfigError(f"LoraConfig: the initial adapter has no {key}; was it saved from this model?")
            if a_side:
                out[key] = torch.cat([value, initial[key].to(value)], dim=0)
            elif b_side:
                out[key] = torch.cat([value, -initial[key].to(value)], dim=1)
            else:
                out[key] = value
        alpha_factor = math.sqrt(2) if self.use_rslora else 2
        converted = attrs.evolve(
            self,
            init_lora_weights=True,
            r=2 * self.r,
            lora_alpha=self.lora_alpha * alpha_factor,
            rank_pattern={k: 2 * v for k, v in self.rank_pattern.items()},
            alpha_pattern={k: 2 * v for k, v in self.alpha_pattern.items()},
        )
        return converted, out

    def scaling_for(self, module_name: str, *, rank_stabilized: bool | None = None) -> float:
        """``lora_alpha / r`` for the module (``/ √r`` with ``use_rslora``)."""
        stabilized = self.use_rslora if rank_stabilized is None else rank_stabilized
        return super().scaling_for(module_name, rank_stabilized=stabilized)

    def trainable_base_parameters(self, model: Any, adapted_paths: list[str]) -> list[str]:
        return trainable_biases(model, adapted_paths, self.bias)
