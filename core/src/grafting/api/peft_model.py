"""PeftModel: the wrapper users hold, with PEFT's API; each job it delegates lives in its own module.

Forward and routing: :mod:`grafting.api.forward`; saving: :mod:`grafting.api.saving`; loading
weights: :mod:`grafting.api.loading`; the task classes: :mod:`grafting.api.tasks`; the mixed
model: :mod:`grafting.api.mixed`; ``get_peft_model`` and ``inject_adapter_in_model``:
:mod:`grafting.api.factory`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from grafting.api.forward import call_model
from grafting.api.loading import (
    checkpoint_key_mapping,
    give_back,
    grad_flags,
    is_checkpointing,
    load_adapter_weights,
)
from grafting.api.prepare import prepare_model_for_gradient_checkpointing
from grafting.api.saving import DEFAULT, save_adapters, write_card
from grafting.config.adapter_config import AdapterConfig, load_config
from grafting.errors import AdapterStateError
from grafting.io.hub import push_folder, resolve_adapter_folder
from grafting.io.state_dict import LoadResult
from grafting.io.transaction import reading
from grafting.model.tuner import AdapterModel
from grafting.registry.plugins import get_registry

#: The wrapper classes by the task type they serve, and the mixed class under ``_MIXED``.
_CLASSES: dict[str, type[PeftModel]] = {}
_MIXED = "<mixed>"


class PeftModel(nn.Module):
    """A model with adapters. ``base_model`` is the :class:`AdapterModel`; the user's model is ``base_model.model``."""

    #: The ``task_type`` this class serves (the task classes of :mod:`grafting.api.tasks` set it).
    serves_task: ClassVar[str | None] = None
    #: Whether this class holds adapters of several methods and loads every adapter of a folder.
    serves_mixed: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "serves_task" in cls.__dict__ and cls.serves_task is not None:
            _CLASSES.setdefault(cls.serves_task, cls)
        if cls.__dict__.get("serves_mixed"):
            _CLASSES.setdefault(_MIXED, cls)

    @classmethod
    def class_for(cls, task_type: str | None, *, mixed: bool = False) -> type[PeftModel]:
        """The wrapper class for ``task_type`` (``PeftModel`` for none or an unknown one), or the mixed class."""
        return _CLASSES.get(_MIXED if mixed else (task_type or ""), PeftModel)

    @classmethod
    def load_every_adapter(cls, model: nn.Module, folder: str, *, is_trainable: bool, strict: bool) -> PeftModel:
        """Load every adapter saved in ``folder`` (a mixed model's job: :class:`grafting.PeftMixedModel`)."""
        raise AdapterStateError(f"{cls.__name__} holds adapters of one method; load a folder of several as mixed")

    def __init__(
        self,
        model: nn.Module,
        peft_config: AdapterConfig,
        adapter_name: str = DEFAULT,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        mixed: bool = False,
    ) -> None:
        super().__init__()
        self.base_model = AdapterModel(model, mixed=mixed)
        self.base_model.add_adapter(
            adapter_name,
            peft_config,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
        )
        if is_checkpointing(model):  # as PEFT: adapters behind checkpointed blocks get gradients
            self.prepare_model_for_gradient_checkpointing(model)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # -- adapters ---------------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, AdapterConfig]:
        return self.base_model.peft_config

    @property
    def active_adapters(self) -> list[str]:
        return list(self.base_model.active_adapters)

    @property
    def active_adapter(self) -> str:
        return self.base_model.active_adapters[0]

    @property
    def active_peft_config(self) -> AdapterConfig:
        return self.peft_config[self.active_adapter]

    @property
    def base_model_torch_dtype(self) -> torch.dtype | None:
        return getattr(self.base_model.model, "dtype", None)

    @property
    def has_active_enabled_adapter(self) -> bool:
        """Whether some adapter is active and the adapters are not disabled."""
        return bool(self.active_adapters) and not self.base_model.disabled

    @property
    def modules_to_save(self) -> set[str] | None:
        """The module names every adapter's ``modules_to_save`` lists (task heads included), or None."""
        names = {n for c in self.peft_config.values() for n in (c.modules_to_save or [])}
        return names or None

    @property
    def prompt_encoder(self) -> nn.ModuleDict:
        """The model-level adapters (prompt tuning, P-tuning, prefix tuning) by adapter name."""
        return self.base_model.model_adapters

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: AdapterConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add a new adapter, inactive and frozen until :meth:`set_adapter` (unless it is the only one).

        ``autocast_adapter_dtype`` keeps a float16/bfloat16 base's new adapter in float32.
        """
        self.base_model.add_adapter(
            adapter_name,
            peft_config,
            low_cpu_mem_usage=low_cpu_mem_usage,
            autocast_adapter_dtype=autocast_adapter_dtype,
        )

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate ``adapter_name``; it becomes trainable unless ``inference_mode`` (PEFT's behaviour)."""
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Let the given adapters train, or freeze them, whether active or not."""
        self.base_model.set_requires_grad(adapter_names, requires_grad=requires_grad)

    def delete_adapter(self, adapter_name: str | list[str]) -> None:
        """Remove one adapter or a list of them."""
        self.base_model.delete_adapter(adapter_name)

    def supports_lora_conversion(self, adapter_name: str = DEFAULT) -> bool:
        """Whether the adapter is additive (``W + ΔW`` on every layer it touches), so LoRA can express it."""
        return self.base_model.supports_lora_conversion(adapter_name)

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        """Make the embeddings' output require grad (unless ``model`` is quantized), so checkpointed blocks backprop."""
        return prepare_model_for_gradient_checkpointing(model)

    def disable_adapter(self) -> contextlib.AbstractContextManager[None]:
        """Context manager: inside it the model computes as the base model."""
        return self.base_model.disable_adapter()

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    # -- parameters ---------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; packed (4-bit) weights count as the plugin that packs them says."""
        count = get_registry().hook.grafting_parameter_count
        trainable = total = 0
        for p in self.parameters():
            n = count(param=p) or p.numel()
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # -- forward ----------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return call_model(self, self.base_model.model, args, kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return call_model(self, self.base_model.model.generate, args, kwargs, generate=True)

    # -- merging ----------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        return self.base_model.merge_and_unload(
            progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    def unload(self) -> nn.Module:
        return self.base_model.unload()

    # -- saving -------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: bool | str = "auto",
        is_main_process: bool = True,
        state_dict: dict[str, Any] | None = None,
        path_initial_model_for_weight_conversion: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write each adapter in PEFT's format: ``default`` at the root, others in a subfolder.

        ``state_dict``: the whole model's tensors (keyed as ``self.state_dict()``) to save the adapters'
        from, instead of the model's own, e.g. a full state dict gathered on rank 0 from a sharded model.
        Without it, FSDP2-sharded adapter tensors are gathered from every rank: call this on all ranks
        then, with ``is_main_process`` true on the one that writes.

        ``path_initial_model_for_weight_conversion`` names the folder an adapter whose
        initialization rewrote the base weight (PiSSA, OLoRA) was saved to right after
        creation; each adapter is then written as one that applies to the original
        base model (``AdapterConfig.as_update_of_base``). That folder is only read.
        """
        save_adapters(
            self,
            save_directory,
            safe_serialization=safe_serialization,
            selected_adapters=selected_adapters,
            save_embedding_layers=save_embedding_layers,
            is_main_process=is_main_process,
            state_dict=state_dict,
            path_initial_model_for_weight_conversion=path_initial_model_for_weight_conversion,
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        tags: list[str] | None = None,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: bool | str = "auto",
    ) -> Any:
        """Upload the adapters to the Hub model repo ``repo_id``: exactly the folder :meth:`save_pretrained` writes.

        One commit through ``huggingface_hub`` (the repo and the branch ``revision`` are created if missing);
        ``tags`` go into the model card. Returns the ``CommitInfo``.
        """

        def write(folder: str) -> None:
            self.save_pretrained(
                folder,
                safe_serialization=safe_serialization,
                selected_adapters=selected_adapters,
                save_embedding_layers=save_embedding_layers,
            )

        return push_folder(
            write,
            repo_id,
            commit_message=commit_message,
            commit_description=commit_description,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
            tags=tags,
        )

    def create_or_update_model_card(self, output_dir: str) -> None:
        write_card(self, output_dir)

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = DEFAULT,
        is_trainable: bool = False,
        config: AdapterConfig | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        *,
        mixed: bool = False,
        strict: bool = True,
        subfolder: str | None = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Load a saved adapter (grafting's or PEFT's) onto ``model``.

        With ``mixed=True`` every adapter saved in the folder (the root and each
        subfolder with an adapter_config.json) is loaded and all are activated.
        A ``config`` given is the one the model keeps (its ``inference_mode`` is
        set from ``is_trainable``, as PEFT does). ``key_mapping`` (regex ->
        replacement, first match wins) renames the file's keys, after their
        ``base_model.model.`` prefix, before loading; by default the model's
        ``_checkpoint_conversion_mapping``. ``ephemeral_gpu_offload`` is accepted and has no effect.
        """
        folder = resolve_adapter_folder(model_id, subfolder, revision)
        with reading(folder):
            if mixed and config is None:
                return PeftModel.class_for(None, mixed=True).load_every_adapter(
                    model, folder, is_trainable=is_trainable, strict=strict
                )
            if config is None:
                config = load_config(folder)
            elif not isinstance(config, AdapterConfig):
                raise TypeError(f"config must be a grafting adapter config, got {type(config).__name__}")
            config.inference_mode = not is_trainable  # the config given is the one kept, as in PEFT
            key_mapping = checkpoint_key_mapping(model, config, key_mapping)
            klass = cls if cls is not PeftModel else PeftModel.class_for(config.task_type)
            flags = grad_flags(model)
            peft_model = klass(
                model,
                config,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=True,
                mixed=mixed,
            )
            try:
                load_adapter_weights(peft_model, folder, adapter_name, strict=strict, key_mapping=key_mapping)
            except BaseException:
                give_back(peft_model, flags)
                raise
            if not is_trainable:
                peft_model.eval()
            return peft_model

    def load_adapter(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        *,
        strict: bool = True,
        subfolder: str | None = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> LoadResult:
        """Load a saved adapter as ``adapter_name`` beside the ones the model holds.

        Returns the load result (``missing_keys``: adapter tensors the file
        lacked; ``unexpected_keys``: file keys that fit nothing), both empty
        unless ``strict=False``. With ``is_trainable`` the adapter trains even
        while inactive, as in PEFT.
        """
        folder = resolve_adapter_folder(model_id, subfolder, revision)
        with reading(folder):
            config = load_config(folder)
            config.inference_mode = not is_trainable
            key_mapping = checkpoint_key_mapping(self.base_model.model, config, key_mapping)
            self.base_model.add_adapter(  # on the meta device unless tensors may be missing (strict=False)
                adapter_name,
                config,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=strict or low_cpu_mem_usage,
            )
            try:
                result = load_adapter_weights(self, folder, adapter_name, strict=strict, key_mapping=key_mapping)
            except BaseException:
                self.base_model.delete_adapter(adapter_name)
                raise
        if is_trainable:
            self.base_model.set_requires_grad(adapter_name, True)
        else:
            self.eval()
        return result


__all__ = ["DEFAULT", "PeftModel"]
