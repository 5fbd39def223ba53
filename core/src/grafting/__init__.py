"""grafting: parameter-efficient fine-tuning with one protocol for every method.

The core holds the protocol, matching, configs, state-dict I/O and wrappers;
each method is a plugin distribution. Method configs (``grafting.LoraConfig``)
resolve lazily to the installed plugin's class.
"""

from __future__ import annotations

from typing import Any

from grafting.api.auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from grafting.api.export import convert_to_lora, save_as_lora
from grafting.api.factory import get_peft_model, inject_adapter_in_model
from grafting.api.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from grafting.api.mixed import PeftMixedModel
from grafting.api.peft_model import PeftModel
from grafting.api.prepare import (
    cast_mixed_precision_params,
    prepare_model_for_gradient_checkpointing,
    prepare_model_for_kbit_training,
)
from grafting.api.status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from grafting.api.tasks import (
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from grafting.config.adapter_config import AdapterConfig, PeftType, TaskType
from grafting.errors import (
    ActiveAdaptersError,
    AdapterLoadError,
    AdapterNotFoundError,
    AdapterStateError,
    BaseStateDictError,
    BeyondPeftWarning,
    CombinationError,
    ConfigError,
    ExportError,
    GraftingError,
    GraftingWarning,
    MergeError,
    NotAvailableError,
    PluginConflictError,
    PluginError,
    StateDictKeyError,
    TargetNotFoundError,
    TiedWeightsWarning,
    UnknownMethodError,
    UnsupportedLayerError,
    UnusedOptionWarning,
)
from grafting.io.hub import load_peft_weights
from grafting.io.inspection import inspect_adapter
from grafting.io.state_dict import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from grafting.model.grouping import shared_input_grouping
from grafting.model.layer import AdaptedLayer
from grafting.model.routing import route_samples
from grafting.protocol import (
    AdapterContext,
    DeltaAdapter,
    InputAdapter,
    LayerAdapter,
    LayerCall,
    Method,
    ModelAdapter,
    OutputAdapter,
    SharedState,
    Site,
    WeightAdapter,
    hookimpl,
)
from grafting.registry.dispatch import config_from_dict, get_peft_config
from grafting.registry.method import peft_type_of_config
from grafting.registry.plugins import get_method, get_registry, register_plugin, unregister_plugin

__version__ = "0.1.0"

PeftConfig = AdapterConfig
#: PEFT's names for grafting's base classes, so ``except PeftError`` and warning filters keep working.
PeftError = GraftingError
PeftWarning = GraftingWarning
NoMatchingPeftModuleError = TargetNotFoundError


def __getattr__(name: str) -> Any:
    """Resolve ``grafting.XxxConfig`` to the class of the installed plugin."""
    for method in get_registry().methods.values():
        if method.config_class.__name__ == name:
            return method.config_class
        if name in method.exports:
            return method.exports[name]
    known = peft_type_of_config(name)
    if known is not None:
        get_method(known)  # raises UnknownMethodError with the install hint
    raise AttributeError(f"module 'grafting' has no attribute {name!r}")


__all__ = [
    "ActiveAdaptersError",
    "AdaptedLayer",
    "AdapterConfig",
    "AdapterContext",
    "AdapterLoadError",
    "AdapterNotFoundError",
    "AdapterStateError",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "BaseStateDictError",
    "BeyondPeftWarning",
    "CombinationError",
    "ConfigError",
    "DeltaAdapter",
    "ExportError",
    "GraftingError",
    "GraftingWarning",
    "InputAdapter",
    "LayerAdapter",
    "LayerCall",
    "MergeError",
    "Method",
    "ModelAdapter",
    "NoMatchingPeftModuleError",
    "NotAvailableError",
    "OutputAdapter",
    "PeftConfig",
    "PeftError",
    "PeftMixedModel",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PeftWarning",
    "PluginConflictError",
    "PluginError",
    "SharedState",
    "Site",
    "StateDictKeyError",
    "TargetNotFoundError",
    "TaskType",
    "TiedWeightsWarning",
    "TunerLayerStatus",
    "TunerModelStatus",
    "UnknownMethodError",
    "UnsupportedLayerError",
    "UnusedOptionWarning",
    "WeightAdapter",
    "cast_mixed_precision_params",
    "config_from_dict",
    "convert_to_lora",
    "get_base_model_state_dict",
    "get_layer_status",
    "get_method",
    "get_model_status",
    "get_peft_config",
    "get_peft_model",
    "get_peft_model_state_dict",
    "get_registry",
    "hookimpl",
    "hotswap_adapter",
    "inject_adapter_in_model",
    "inspect_adapter",
    "load_peft_weights",
    "prepare_model_for_compiled_hotswap",
    "prepare_model_for_gradient_checkpointing",
    "prepare_model_for_kbit_training",
    "register_plugin",
    "route_samples",
    "save_as_lora",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
    "shared_input_grouping",
    "unregister_plugin",
]
