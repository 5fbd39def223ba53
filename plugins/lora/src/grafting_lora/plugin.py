"""The grafting plugin for LoRA: declares the method and builds its layer adapters."""

from __future__ import annotations

import warnings

from torch import nn

from grafting import (
    AdapterContext,
    ConfigError,
    GraftingWarning,
    Method,
    PluginError,
    UnsupportedLayerError,
    hookimpl,
)
from grafting.protocol import Combination, CombineRequest
from grafting.toolkit import is_conv, is_linear, query_value_projections, tied_embedding, warn_fan_in_fan_out
from grafting_lora.combine import combination
from grafting_lora.config import LoraConfig
from grafting_lora.corda import initialize_corda, preprocess_corda
from grafting_lora.dora import DoraConv, DoraEmbedding
from grafting_lora.eva import get_eva_state_dict, initialize_lora_eva_weights
from grafting_lora.init import initialize
from grafting_lora.init_configs import CordaConfig, EvaConfig, LoftQConfig
from grafting_lora.layers import LoraConv, LoraEmbedding, LoraLinear
from grafting_lora.loftq import initialize_loftq, replace_lora_weights_loftq
from grafting_lora.parameters import LoraMultiheadAttention, LoraParameters, check_parameter_options
from grafting_lora.saved import check_shapes
from grafting_lora.trainable_tokens import TiedTrainableTokens, TrainableTokens, TrainableTokensHead
from grafting_lora.tying import TiedLoraHead


@hookimpl
def grafting_methods() -> list[Method]:
    return [
        Method(
            peft_type="LORA",
            name="lora",
            config_class=LoraConfig,
            description="Low-rank adaptation (DoRA, rsLoRA)",
            prefix="lora_",
            exports={
                "LoftQConfig": LoftQConfig,
                "EvaConfig": EvaConfig,
                "CordaConfig": CordaConfig,
                "replace_lora_weights_loftq": replace_lora_weights_loftq,
                "get_eva_state_dict": get_eva_state_dict,
                "initialize_lora_eva_weights": initialize_lora_eva_weights,
                "preprocess_corda": preprocess_corda,
            },
        )
    ]


@hookimpl
def grafting_default_target_modules(config: LoraConfig, model: nn.Module) -> list[str] | None:
    return query_value_projections(model)


def _tokens_adapter(
    config: LoraConfig, base_layer: nn.Module, module_name: str, model: nn.Module, context: AdapterContext
) -> nn.Module | None:
    """A trainable-tokens adapter if ``module_name`` carries ``trainable_token_indices``, else None.

    The embeddings' adapters are kept in ``context.state`` for the tied heads created after them.
    """
    plan = config.token_plan(model)
    made: dict[str, TrainableTokens] = context.state.setdefault("token_adapters", {})
    if module_name in plan.own:
        init = config.init_lora_weights is not False
        if isinstance(base_layer, nn.Linear):  # an output head: one row per token id
            return TrainableTokensHead(base_layer, plan.own[module_name], init=init)
        if not isinstance(base_layer, nn.Embedding):
            raise UnsupportedLayerError(
                f"{module_name}: trainable_token_indices needs an nn.Embedding or an output nn.Linear, not a"
                f" {type(base_layer).__name__}"
            )
        adapter = TrainableTokens(base_layer, plan.own[module_name], init=init)
        made[module_name] = adapter
        return adapter
    if module_name in plan.tied:
        embedding = made.get(plan.tied[module_name])
        if embedding is None:
            raise PluginError(f"{module_name}: the embedding whose trainable tokens it follows was not adapted first")
        return TiedTrainableTokens(base_layer, embedding, base_layer.weight)
    return None


def _tied_head(
    config: LoraConfig, base_layer: nn.Module, module_name: str, model: nn.Module, context: AdapterContext
) -> TiedLoraHead | None:
    """With ``ensure_weight_tying``: the LoRA of a head whose weight is the adapted input embedding's."""
    tied = tied_embedding(model)
    if tied is None or module_name not in tied.partners:
        return None
    embedding = context.state.get("lora_embeddings", {}).get(tied.embedding)
    if embedding is None:  # the embedding is not adapted by LoRA here (trainable tokens, say)
        return None
    if not isinstance(base_layer, nn.Linear):  # T5's encoder/decoder embed_tokens: their own LoRA, as in PEFT
        return None
    if config.rank_for(module_name) != embedding.r:
        raise ConfigError(
            f"LoraConfig: {module_name} is tied to {tied.embedding} (ensure_weight_tying) but rank_pattern gives it"
            f" rank {config.rank_for(module_name)}, not the embedding's {embedding.r}"
        )
    return TiedLoraHead(embedding, base_layer.weight, config.scaling_for(module_name), config.lora_dropout)


@hookimpl
def grafting_create_layer_adapter(
    config: LoraConfig, base_layer: nn.Module, module_name: str, model: nn.Module, context: AdapterContext
) -> nn.Module | None:
    if config.trainable_token_indices is not None:
        tokens = _tokens_adapter(config, base_layer, module_name, model, context)
        if tokens is not None:
            return tokens
    if config.ensure_weight_tying:
        tied_head = _tied_head(config, base_layer, module_name, model, context)
        if tied_head is not None:
            return tied_head
    r, scaling = config.rank_for(module_name), config.scaling_for(module_name)
    if config.lora_bias and getattr(base_layer, "bias", None) is None and not isinstance(base_layer, nn.Embedding):
        warnings.warn(  # as PEFT warns; merging such an adapter is refused
            f"`lora_bias=True` was passed but the targeted layer of type {type(base_layer).__name__} has no bias."
            f" This means that merging LoRA weights won't be possible. ({module_name}: the adapter trains a bias"
            " that no base bias can take)",
            GraftingWarning,
            stacklevel=2,
        )
    if config.target_parameters:
        names = config.parameter_plan(model).get(module_name)
        if names:
            check_parameter_options(config, module_name)
            parameters = LoraParameters(base_layer, names, r, scaling, config.init_lora_weights)
            if config.precision is not None:
                parameters.precision = config.precision
            return parameters
    if isinstance(base_layer, nn.MultiheadAttention):
        check_parameter_options(config, module_name)
        return LoraMultiheadAttention(base_layer, r, scaling, config.init_lora_weights)
    if is_linear(base_layer):
        warn_fan_in_fan_out(config, base_layer)
        adapter = _with_precision(
            LoraLinear(
                base_layer, r, scaling, config.lora_dropout, config.init_lora_weights, config.use_dora, config.lora_bias
            ),
            config,
        )
        init = config.init_lora_weights
        if init == "loftq":
            initialize_loftq(adapter, base_layer, config.loftq_config, r)
        elif init == "corda":
            initialize_corda(adapter, base_layer, module_name, r, scaling)
        elif init not in (True, False, "gaussian", "eva"):
            initialize(adapter, base_layer, init, r, scaling)
        return adapter
    if config.init_lora_weights in ("loftq", "corda"):
        raise ConfigError(
            f"{module_name}: init_lora_weights={config.init_lora_weights!r} is for linear layers, not a"
            f" {type(base_layer).__name__}"
        )
    if isinstance(base_layer, nn.Embedding):
        if config.lora_bias:  # PEFT refuses it too, in its words
            raise ConfigError(
                f"lora_bias=True is not supported for {type(base_layer).__name__}. ({module_name}: an embedding's"
                " LoRA factors are looked up, with no lora_B layer to carry a bias; leave this module out of"
                " target_modules or set lora_bias=False)"
            )
        if config.use_dora:
            return DoraEmbedding(base_layer, r, scaling, config.init_lora_weights)
        embedding = LoraEmbedding(base_layer, r, scaling, config.init_lora_weights)
        context.state.setdefault("lora_embeddings", {})[module_name] = embedding
        return embedding
    if is_conv(base_layer):
        if config.init_lora_weights not in (True, False, "gaussian", "eva"):
            raise ConfigError(
                f"{module_name}: init_lora_weights={config.init_lora_weights!r} is for linear layers; PEFT refuses it"
                f" on a {type(base_layer).__name__} too"
            )
        if config.use_dora:
            return _with_precision(
                DoraConv(base_layer, r, scaling, config.lora_dropout, config.init_lora_weights), config
            )
        return _with_precision(
            LoraConv(base_layer, r, scaling, config.lora_dropout, config.init_lora_weights, config.lora_bias), config
        )
    return None


def _with_precision(adapter: LoraLinear | LoraConv, config: LoraConfig) -> LoraLinear | LoraConv:
    if config.precision is not None:
        adapter.precision = config.precision  # type: ignore[assignment]
    return adapter


@hookimpl
def grafting_check_saved_shapes(config: LoraConfig, shapes: dict[str, tuple[int, ...]]) -> list[str] | None:
    return check_shapes(config, shapes)


@hookimpl
def grafting_combine_adapters(request: CombineRequest, model: nn.Module) -> Combination | None:
    return combination(request)
