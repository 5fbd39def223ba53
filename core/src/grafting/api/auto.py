"""One call from an adapter to a ready model: load the base its config names, then the adapter.

``AutoPeftModelForCausalLM.from_pretrained("my-adapter")`` reads
adapter_config.json (a local folder or a Hub repository), loads
``base_model_name_or_path`` with the matching transformers auto class, grows
its embeddings if the adapter folder ships a larger tokenizer, and returns the
``PeftModel`` of the config's task.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, ClassVar

from torch import nn

from grafting.api.peft_model import PeftModel
from grafting.api.tasks import (
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from grafting.config.adapter_config import AdapterConfig, TaskType
from grafting.config.tasks import TASKS
from grafting.errors import AdapterLoadError, ConfigError
from grafting.io.hub import resolve_adapter_folder

#: Packages an adapter config's ``auto_mapping`` may name (PEFT's allowlist): importing is running code.
DEFAULT_IMPORT_ALLOWLIST = ("diffusers", "lerobot", "megatron-core", "transformers")
#: Keyword arguments of ``from_pretrained`` meant for the adapter loader only; the rest go to the base's loader.
_ADAPTER_ONLY = ("strict", "key_mapping", "subfolder", "ephemeral_gpu_offload", "autocast_adapter_dtype")


def _allowed(package: str, allowlist: list[str] | tuple[str, ...]) -> bool:
    return any(package == allowed or package.startswith(allowed + ".") for allowed in allowlist)


class _AutoPeftModel:
    """Base of the auto classes: subclasses name the transformers auto class and the PeftModel class."""

    transformers_class: ClassVar[str | None] = None
    peft_class: ClassVar[type[PeftModel]] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(
            f"{type(self).__name__} is built with {type(self).__name__}.from_pretrained(adapter_folder_or_id)"
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: AdapterConfig | None = None,
        revision: str | None = None,
        import_allowlist: list[str] | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Load the base model the adapter's config names, then the adapter onto it.

        ``kwargs`` go to the base model's ``from_pretrained`` (``torch_dtype``,
        ``device_map``, ...) and to the adapter loader.
        """
        folder = resolve_adapter_folder(pretrained_model_name_or_path, kwargs.get("subfolder"), revision)
        peft_config = config if config is not None else AdapterConfig.from_pretrained(folder)
        base_path = peft_config.base_model_name_or_path
        if not base_path:
            raise AdapterLoadError(f"{folder}: the adapter config names no base_model_name_or_path to load")
        loader = cls._base_model_class(peft_config, import_allowlist or list(DEFAULT_IMPORT_ALLOWLIST))
        base_kwargs = {k: v for k, v in kwargs.items() if k not in _ADAPTER_ONLY}
        base = loader.from_pretrained(base_path, revision=peft_config.revision, **base_kwargs)
        _grow_embeddings_to_tokenizer(base, folder)
        adapter_kwargs = {k: v for k, v in kwargs.items() if k in _ADAPTER_ONLY and k != "subfolder"}
        if "low_cpu_mem_usage" in kwargs:
            adapter_kwargs["low_cpu_mem_usage"] = kwargs["low_cpu_mem_usage"]
        return cls.peft_class.from_pretrained(
            base, folder, adapter_name=adapter_name, is_trainable=is_trainable, config=config, **adapter_kwargs
        )

    @classmethod
    def _base_model_class(cls, config: AdapterConfig, allowlist: list[str]) -> Any:
        task = config.task_type
        if cls.transformers_class is None:
            if task is not None:
                raise ConfigError(
                    f"AutoPeftModel loads adapters without a task type; this one's is {task}: use"
                    f" {_auto_class_for(task)}"
                )
            mapping = config.extra.get("auto_mapping") or {}
            package, name = mapping.get("parent_library"), mapping.get("base_model_class")
            if not package or not name:
                raise ConfigError(
                    "the adapter config has neither a task_type nor an auto_mapping: grafting cannot tell which"
                    " model class to load; load the base model yourself and use PeftModel.from_pretrained"
                )
            if not _allowed(package, allowlist):
                raise ConfigError(
                    f"the adapter config's auto_mapping wants to import {package!r}, which is not in the import"
                    f" allowlist {allowlist}; pass import_allowlist=[{package!r}] if you trust it"
                )
            return getattr(importlib.import_module(package), name)
        if task is not None and PeftModel.class_for(task) is not cls.peft_class:
            raise ConfigError(
                f"the adapter's task_type is {task}; {cls.__name__} loads {cls.peft_class.__name__} adapters:"
                f" use {_auto_class_for(task)}"
            )
        import transformers

        return getattr(transformers, cls.transformers_class)


def _auto_class_for(task: str) -> str:
    return next(c.__name__ for c in AUTO_CLASSES if PeftModel.class_for(task) is c.peft_class)


def _grow_embeddings_to_tokenizer(model: nn.Module, folder: str) -> None:
    """Resize the input embeddings when the adapter folder's tokenizer has more tokens than the model."""
    if not os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        return
    embeddings = getattr(model, "get_input_embeddings", None)
    resize = getattr(model, "resize_token_embeddings", None)
    if not callable(embeddings) or not callable(resize):
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if len(tokenizer) > embeddings().weight.shape[0]:
        resize(len(tokenizer))


class AutoPeftModel(_AutoPeftModel):
    """Adapters without a task type: the base class comes from the config's ``auto_mapping``."""


class AutoPeftModelForCausalLM(_AutoPeftModel):
    transformers_class = TASKS[TaskType.CAUSAL_LM.value].auto_class
    peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(_AutoPeftModel):
    transformers_class = TASKS[TaskType.SEQ_2_SEQ_LM.value].auto_class
    peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(_AutoPeftModel):
    transformers_class = TASKS[TaskType.SEQ_CLS.value].auto_class
    peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_AutoPeftModel):
    transformers_class = TASKS[TaskType.TOKEN_CLS.value].auto_class
    peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(_AutoPeftModel):
    transformers_class = TASKS[TaskType.QUESTION_ANS.value].auto_class
    peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(_AutoPeftModel):
    transformers_class = TASKS[TaskType.FEATURE_EXTRACTION.value].auto_class
    peft_class = PeftModelForFeatureExtraction


AUTO_CLASSES: tuple[type[_AutoPeftModel], ...] = (
    AutoPeftModelForCausalLM,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForFeatureExtraction,
)

__all__ = [
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
]
