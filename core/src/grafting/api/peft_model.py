"""PeftModel and its task classes: the wrapper users hold, with PEFT's API."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from grafting.api.signatures import FEATURE_INPUTS, LM_INPUTS, QA_INPUTS, SEQ2SEQ_INPUTS, keyword_forward
from grafting.config.adapter_config import (
    CONFIG_NAME,
    AdapterConfig,
    TaskType,
    read_config_file,
)
from grafting.errors import (
    AdapterLoadError,
    AdapterNotFoundError,
    AdapterStateError,
    ConfigError,
    GraftingWarning,
    NotAvailableError,
    TargetNotFoundError,
)
from grafting.io.files import (
    BIN_NAME,
    CONFIG_DIGEST_KEY,
    SAFETENSORS_NAME,
    atomic_write_text,
    check_pair,
    config_digest,
    load_weights,
    remap_keys,
    save_weights,
    weights_path,
)
from grafting.io.hub import push_folder, resolve_adapter_folder, write_model_card
from grafting.io.state_dict import (
    LoadResult,
    attach_tuner,
    get_peft_model_state_dict,
    injected_tuner,
    plan_peft_model_state_dict,
)
from grafting.io.transaction import inside, is_bookkeeping, reading, save_transaction
from grafting.model.routing import BASE, route_samples
from grafting.model.tuner import AdapterModel, drawing_as_peft
from grafting.registry.dispatch import load_config

DEFAULT = "default"


class PeftModel(nn.Module):
    """A model with adapters. ``base_model`` is the :class:`AdapterModel`; the user's model is ``base_model.model``."""

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
        if _is_checkpointing(model):  # as PEFT: adapters behind checkpointed blocks get gradients
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
        from grafting.api.prepare import prepare_model_for_gradient_checkpointing

        return prepare_model_for_gradient_checkpointing(model)

    def disable_adapter(self) -> contextlib.AbstractContextManager[None]:
        """Context manager: inside it the model computes as the base model."""
        return self.base_model.disable_adapter()

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    # -- parameters ---------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; 4-bit packed weights count twice."""
        trainable = total = 0
        for p in self.parameters():
            n = p.numel()
            if p.__class__.__name__ == "Params4bit":
                n *= 2
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
    @contextlib.contextmanager
    def _routing(self, adapter_names: list[str] | None) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        unknown = sorted({n for n in adapter_names if n != BASE and n not in self.peft_config})
        if unknown:
            raise AdapterNotFoundError(f"adapter_names names adapters the model does not hold: {unknown}")
        with route_samples(adapter_names):
            yield

    def _call(self, fn: Any, args: tuple, kwargs: dict[str, Any], *, generate: bool = False) -> Any:
        adapter_names = kwargs.pop("adapter_names", None)
        model_adapter = self.base_model.active_model_adapter()
        if model_adapter is not None and adapter_names is not None:
            raise AdapterStateError(
                "adapter_names cannot route samples while a model-level adapter is active: it changes the"
                " whole batch's inputs"
            )
        with self._routing(adapter_names):
            if model_adapter is None:
                return fn(*args, **kwargs)
            if args:
                kwargs["input_ids"], args = args[0], args[1:]
            prepare = model_adapter.prepare_generate if generate else model_adapter.prepare
            prepared = prepare(kwargs, self.base_model.model)
            return model_adapter.finish(fn(*args, **prepared), prepared)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(self.base_model.model, args, kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(self.base_model.model.generate, args, kwargs, generate=True)

    # -- merging ----------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def _refuse_for_prompt_learning(self, operation: str) -> None:
        """PEFT's prompt-learning model has no ``unload``/``merge_and_unload``: the same AttributeError here."""
        names = list(self.peft_config)
        if names and all(name in self.base_model.model_adapters for name in names):
            raise NotAvailableError(
                f"'{type(self.base_model.model).__name__}' object has no attribute '{operation}': adapters {names}"
                " act on the model's inputs, not its layers; get_base_model() is the model without them"
            )

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        self._refuse_for_prompt_learning("merge_and_unload")
        return self.base_model.merge_and_unload(
            progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    def unload(self) -> nn.Module:
        self._refuse_for_prompt_learning("unload")
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
        if os.path.isfile(save_directory):
            raise AdapterLoadError(f"cannot save adapters to {save_directory}: it is a file, not a folder")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in names:
            self.base_model._require(name)
        saved = {
            name: get_peft_model_state_dict(
                self, state_dict, adapter_name=name, save_embedding_layers=save_embedding_layers
            )
            for name in names
        }
        if not is_main_process:
            return
        outputs: dict[str, tuple[AdapterConfig, dict[str, Any]]] = {}
        for name in names:  # every conversion is checked before anything is written
            config, tensors = self.peft_config[name], saved[name]
            if path_initial_model_for_weight_conversion is not None:
                initial = load_weights(os.fspath(path_initial_model_for_weight_conversion))
                config, tensors = config.as_update_of_base(tensors, initial)
            outputs[name] = (config, tensors)
        root = os.fspath(save_directory)
        weights = SAFETENSORS_NAME if safe_serialization else BIN_NAME
        other = BIN_NAME if safe_serialization else SAFETENSORS_NAME
        folders = {name: "" if name == DEFAULT else name for name in names}
        base_name = getattr(getattr(self.base_model.model, "config", None), "name_or_path", None) or None
        # every adapter of this call in one transaction: after a crash the folder holds all old or all new
        with save_transaction(root, remove=[os.path.join(f, other) for f in folders.values()]) as staging:
            for name, sub in folders.items():
                folder = inside(staging, os.path.join(staging, sub))
                os.makedirs(folder, exist_ok=True)
                config, tensors = outputs[name]
                data = config.to_dict()
                data["inference_mode"] = True
                if data.get("base_model_name_or_path") is None:
                    data["base_model_name_or_path"] = base_name
                if data.get("task_type") is None:  # for AutoPeftModel, as PEFT writes it
                    base_class = type(self.base_model.model)
                    data["auto_mapping"] = {
                        "base_model_class": base_class.__name__,
                        "parent_library": base_class.__module__,
                    }
                text = type(config).from_dict(data).to_json_string()
                digest = config_digest(json.loads(text))
                path = inside(folder, os.path.join(folder, weights))
                save_weights(tensors, path, safe_serialization=safe_serialization, metadata={CONFIG_DIGEST_KEY: digest})
                atomic_write_text(inside(folder, os.path.join(folder, CONFIG_NAME)), text)
            card = os.path.join(root, "README.md")
            if os.path.isfile(card):
                shutil.copyfile(card, os.path.join(staging, "README.md"))
            self.create_or_update_model_card(staging)

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
        base_name = getattr(getattr(self.base_model.model, "config", None), "name_or_path", None) or None
        methods = sorted({c.peft_type for c in self.peft_config.values()})
        write_model_card(output_dir, base_model=base_name, methods=methods)

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
                return PeftMixedModel._load_all(model, folder, is_trainable=is_trainable, strict=strict)
            if config is None:
                config = load_config(folder)
            elif not isinstance(config, AdapterConfig):
                raise TypeError(f"config must be a grafting adapter config, got {type(config).__name__}")
            config.inference_mode = not is_trainable  # the config given is the one kept, as in PEFT
            if key_mapping is None and not _is_prompt_learning(config):
                key_mapping = getattr(model, "_checkpoint_conversion_mapping", None)
            klass = cls if cls is not PeftModel else TASK_CLASSES.get(config.task_type or "", PeftModel)
            flags = _grad_flags(model)
            with drawing_as_peft(not low_cpu_mem_usage):  # PEFT builds the adapter for real unless asked not to
                peft_model = klass(
                    model,
                    config,
                    adapter_name,
                    autocast_adapter_dtype=autocast_adapter_dtype,
                    low_cpu_mem_usage=True,
                    mixed=mixed,
                )
            try:
                peft_model._load_weights(folder, adapter_name, strict=strict, key_mapping=key_mapping)
            except BaseException:
                _give_back(peft_model, flags)
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
            if key_mapping is None and not _is_prompt_learning(config):
                key_mapping = getattr(self.base_model.model, "_checkpoint_conversion_mapping", None)
            with drawing_as_peft(not low_cpu_mem_usage):  # PEFT builds the adapter for real unless asked not to
                self.base_model.add_adapter(  # on the meta device unless tensors may be missing (strict=False)
                    adapter_name,
                    config,
                    autocast_adapter_dtype=autocast_adapter_dtype,
                    low_cpu_mem_usage=strict or low_cpu_mem_usage,
                )
            try:
                result = self._load_weights(folder, adapter_name, strict=strict, key_mapping=key_mapping)
            except BaseException:
                self.base_model.delete_adapter(adapter_name)
                raise
        if is_trainable:
            self.base_model.set_requires_grad(adapter_name, True)
        else:
            self.eval()
        return result

    def _load_weights(
        self, folder: str, adapter_name: str, *, strict: bool, key_mapping: dict[str, str] | None = None
    ) -> LoadResult:
        """Read the folder's weights and load them; every check passes before any tensor of the model changes."""
        tensors = remap_keys(load_weights(folder), key_mapping)
        plan = plan_peft_model_state_dict(self, tensors, adapter_name=adapter_name, source=weights_path(folder))
        result = plan.result
        if strict and (result.unexpected_keys or result.missing_keys):
            parts = []
            if result.unexpected_keys:
                parts.append(
                    f"{len(result.unexpected_keys)} keys fit no adapter tensor (first: {result.unexpected_keys[:3]})"
                )
            if result.missing_keys:
                parts.append(
                    f"{len(result.missing_keys)} adapter tensors are not in the file (first: {result.missing_keys[:3]})"
                )
            raise AdapterLoadError(f"{folder} does not match adapter {adapter_name!r}: " + "; ".join(parts))
        if plan.unfilled_meta:
            raise AdapterLoadError(
                f"{folder}: adapter {adapter_name!r} has tensors the file did not fill (left on the meta device):"
                f" {plan.unfilled_meta[:3]}"
            )
        check_pair(folder, read_config_file(folder))  # shapes fit: are these weights the config's own?

        def filled() -> None:
            still_meta = [
                f"{path}.{name}"
                for path, module in self.base_model.adapter_modules(adapter_name)
                for name, tensor in [*module.named_parameters(), *module.named_buffers()]
                if tensor.is_meta
            ]
            if still_meta:
                raise AdapterLoadError(
                    f"{folder}: adapter {adapter_name!r} has tensors the file did not fill (left on the meta device):"
                    f" {still_meta[:3]}; a tensor the file does not hold must be created with an explicit device"
                )

        plan.apply(after=filled)
        return result


def _grad_flags(model: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    return [(p, p.requires_grad) for p in model.parameters()]


def _give_back(peft_model: PeftModel, flags: list[tuple[nn.Parameter, bool]]) -> None:
    """Undo a failed load: every adapter out, the user's model as it was given (wrappers, requires_grad)."""
    for name in list(peft_model.peft_config):
        peft_model.base_model.delete_adapter(name)
    for param, flag in flags:
        param.requires_grad_(flag)


def _with_mode(config: AdapterConfig, *, inference_mode: bool) -> AdapterConfig:
    config.inference_mode = inference_mode
    return config


def _is_checkpointing(model: nn.Module) -> bool:
    """Whether ``model`` has gradient checkpointing on (True for a model that cannot say, as PEFT assumes)."""
    for flag in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5 renamed it
        if flag in dir(type(model)) or flag in model.__dict__:
            return bool(getattr(model, flag))
    return True


def _is_prompt_learning(config: AdapterConfig) -> bool:
    return bool(config.is_prompt_learning)


class PeftModelForCausalLM(PeftModel):
    """Decoder-only language models (``task_type="CAUSAL_LM"``)."""

    forward = keyword_forward(LM_INPUTS)


class PeftModelForSeq2SeqLM(PeftModel):
    """Encoder-decoder language models (``task_type="SEQ_2_SEQ_LM"``)."""

    forward = keyword_forward(SEQ2SEQ_INPUTS)

    def generate(self, **kwargs: Any) -> Any:
        """Keywords only, as PEFT's: a positional input is a ``TypeError``."""
        return super().generate(**kwargs)


class PeftModelForSequenceClassification(PeftModel):
    """Sequence classification; the head (``classifier``/``score``) trains in full."""

    forward = keyword_forward(LM_INPUTS)


class PeftModelForTokenClassification(PeftModel):
    """Token classification; the head (``classifier``/``score``) trains in full."""

    forward = keyword_forward(LM_INPUTS)


class PeftModelForQuestionAnswering(PeftModel):
    """Extractive question answering; ``qa_outputs`` trains in full."""

    forward = keyword_forward(QA_INPUTS)


class PeftModelForFeatureExtraction(PeftModel):
    """Embedding models (``task_type="FEATURE_EXTRACTION"``)."""

    forward = keyword_forward(FEATURE_INPUTS)


class PeftMixedModel(PeftModel):
    """A model whose adapters may be of different methods, active together (even on one layer)."""

    def __init__(
        self, model: nn.Module, peft_config: AdapterConfig, adapter_name: str = DEFAULT, **kwargs: Any
    ) -> None:
        kwargs["mixed"] = True
        super().__init__(model, peft_config, adapter_name, **kwargs)

    @classmethod
    def _load_all(cls, model: nn.Module, folder: str, *, is_trainable: bool, strict: bool) -> PeftModel:
        found = saved_adapters(folder)
        if not found:
            raise AdapterLoadError(
                f"{folder} holds no saved adapter (no adapter_config.json at its root or in a subfolder)"
            )
        (first, first_folder), rest = found[0], found[1:]
        config = _with_mode(load_config(first_folder), inference_mode=not is_trainable)
        flags = _grad_flags(model)
        mixed = cls(model, config, first, low_cpu_mem_usage=True)
        try:
            mixed._load_weights(first_folder, first, strict=strict)
            for name, sub in rest:
                mixed.load_adapter(sub, name, is_trainable=is_trainable, strict=strict)
        except BaseException:
            _give_back(mixed, flags)
            raise
        mixed.set_adapter([name for name, _ in found], inference_mode=not is_trainable)
        if not is_trainable:
            mixed.eval()
        return mixed


def saved_adapters(folder: str) -> list[tuple[str, str]]:
    """(adapter name, folder) of every adapter saved under ``folder``: ``default`` at the root, others in subfolders."""
    found: list[tuple[str, str]] = []
    if os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        found.append((DEFAULT, folder))
    for entry in sorted(os.listdir(folder)):
        sub = os.path.join(folder, entry)
        if not is_bookkeeping(entry) and os.path.isfile(os.path.join(sub, CONFIG_NAME)):
            found.append((entry, sub))
    return found


TASK_CLASSES: dict[str, type[PeftModel]] = {
    TaskType.CAUSAL_LM.value: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM.value: PeftModelForSeq2SeqLM,
    TaskType.SEQ_CLS.value: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS.value: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS.value: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION.value: PeftModelForFeatureExtraction,
}


def get_peft_model(
    model: nn.Module,
    peft_config: AdapterConfig,
    adapter_name: str = DEFAULT,
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap ``model`` with a new adapter from ``peft_config``; the class follows ``task_type``.

    As in PEFT, ``peft_config`` is the config the model keeps: its
    ``base_model_name_or_path`` becomes the model's name (a warning says so when
    that renames it; a model without a name keeps the config's) and ``revision``
    is written into it.
    """
    name = model.__dict__.get("name_or_path") or None
    if name is not None:
        old = peft_config.base_model_name_or_path
        if old is not None and old != name:
            warnings.warn(
                f"the config's base_model_name_or_path {old!r} is replaced by the model's name {name!r}; the saved"
                " adapter names that base model",
                GraftingWarning,
                stacklevel=2,
            )
        peft_config.base_model_name_or_path = name
    if revision is not None:
        if peft_config.revision is not None and peft_config.revision != revision:
            warnings.warn(
                f"the config's revision {peft_config.revision!r} is replaced by revision={revision!r}",
                GraftingWarning,
                stacklevel=2,
            )
        peft_config.revision = revision
    klass = PeftMixedModel if mixed else TASK_CLASSES.get(peft_config.task_type or "", PeftModel)
    return klass(
        model,
        peft_config,
        adapter_name,
        autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
        mixed=mixed,
    )


def inject_adapter_in_model(
    peft_config: AdapterConfig,
    model: nn.Module,
    adapter_name: str = DEFAULT,
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Put adapters into ``model`` in place, without a PeftModel wrapper; returns ``model``.

    The adapters' tuner stays reachable from ``model`` (a plain attribute, so
    ``model.state_dict()`` is unchanged), so ``get_peft_model_state_dict(model)``
    and ``set_peft_model_state_dict(model, sd)`` work on it with PEFT's keys
    (without the ``base_model.model.`` prefix). With ``state_dict``, the
    modules its keys name are adapted instead of the config's targets (its
    values are not loaded). ``low_cpu_mem_usage`` creates the adapter on the
    meta device, to be filled by ``set_peft_model_state_dict``.
    """
    if peft_config.is_prompt_learning:
        raise ConfigError(
            f"inject_adapter_in_model cannot add a {peft_config.peft_type} adapter: it acts on the model's inputs,"
            " so it needs get_peft_model"
        )
    tuner = injected_tuner(model)
    if tuner is None:
        tuner = AdapterModel(model, mixed=True)
    if state_dict is not None:
        peft_config = _targets_from_state_dict(peft_config, model, state_dict)
    tuner.add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
    attach_tuner(model, tuner)
    return model


def _targets_from_state_dict(
    config: AdapterConfig, model: nn.Module, state_dict: dict[str, torch.Tensor]
) -> AdapterConfig:
    """``config`` aimed at the modules that ``state_dict``'s keys hold adapter tensors for (PEFT's rule)."""
    import attrs

    from grafting.model.matching import candidate_modules, find_targets
    from grafting.registry.plugins import get_method, get_registry

    modules = dict(candidate_modules(model))
    targets: set[str] = set()
    for key in state_dict:
        key = key.removeprefix("base_model.model.")
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):  # the longest module name the key starts with
            name = ".".join(parts[:cut])
            if name in modules:
                rest = ".".join(parts[cut:])
                if rest not in dict(modules[name].named_parameters()) | dict(modules[name].named_buffers()):
                    targets.add(name)  # an adapter tensor, not one of the module's own (modules_to_save)
                break
    if not targets:
        raise TargetNotFoundError("inject_adapter_in_model: the state_dict's keys name no module of the model")
    method = get_method(str(config.peft_type))
    defaults = get_registry().call(method, "grafting_default_target_modules", config=config, model=model)
    try:
        from_config = set(find_targets(model, config, defaults))
    except TargetNotFoundError:
        from_config = set()
    if from_config != targets:
        warnings.warn(
            "inject_adapter_in_model: the state_dict adapts other modules than the config's target_modules;"
            f" following the state_dict (config only: {sorted(from_config - targets)},"
            f" state_dict only: {sorted(targets - from_config)})",
            RuntimeWarning,
            stacklevel=3,
        )
    return attrs.evolve(
        config, target_modules=sorted(targets), layers_to_transform=None, layers_pattern=None, exclude_modules=None
    )


__all__ = [
    "TASK_CLASSES",
    "PeftMixedModel",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "get_peft_model",
    "inject_adapter_in_model",
]
