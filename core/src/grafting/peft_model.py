"""PeftModel and its task classes: the wrapper users hold, with PEFT's API."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

from torch import nn

from grafting.config import CONFIG_NAME, AdapterConfig, TaskType, read_config_file
from grafting.dispatch import load_config
from grafting.errors import AdapterLoadError, AdapterNotFoundError, AdapterStateError
from grafting.hub import push_folder, resolve_adapter_folder, write_model_card
from grafting.io import (
    BIN_NAME,
    CONFIG_DIGEST_KEY,
    SAFETENSORS_NAME,
    atomic_write_text,
    check_pair,
    config_digest,
    load_weights,
    save_weights,
    weights_path,
)
from grafting.routing import BASE, route_samples
from grafting.signatures import FEATURE_INPUTS, LM_INPUTS, QA_INPUTS, SEQ2SEQ_INPUTS, keyword_forward
from grafting.state_dict import get_peft_model_state_dict, plan_peft_model_state_dict
from grafting.transaction import inside, is_bookkeeping, reading, save_transaction
from grafting.tuner import AdapterModel

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

    def add_adapter(self, adapter_name: str, peft_config: AdapterConfig, low_cpu_mem_usage: bool = False) -> None:
        """Add a new adapter (inactive until :meth:`set_adapter`, unless it is the only one)."""
        self.base_model.add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        self.base_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

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
        **kwargs: Any,
    ) -> None:
        """Write each adapter in PEFT's format: ``default`` at the root, others in a subfolder.

        ``state_dict``: the whole model's tensors (keyed as ``self.state_dict()``) to save the adapters'
        from, instead of the model's own, e.g. a full state dict gathered on rank 0 from a sharded model.
        Without it, FSDP2-sharded adapter tensors are gathered from every rank: call this on all ranks
        then, with ``is_main_process`` true on the one that writes.
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
                tensors = saved[name]
                config = self.peft_config[name]
                data = config.to_dict()
                data["inference_mode"] = True
                if data.get("base_model_name_or_path") is None:
                    data["base_model_name_or_path"] = base_name
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
        low_cpu_mem_usage: bool = False,
        mixed: bool = False,
        strict: bool = True,
        subfolder: str | None = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Load a saved adapter (grafting's or PEFT's) onto ``model``.

        With ``mixed=True`` every adapter saved in the folder (the root and each
        subfolder with an adapter_config.json) is loaded and all are activated.
        """
        folder = resolve_adapter_folder(model_id, subfolder, revision)
        with reading(folder):
            if mixed and config is None:
                return PeftMixedModel._load_all(model, folder, is_trainable=is_trainable, strict=strict)
            if config is None:
                config = load_config(folder)
            config = _with_mode(config, inference_mode=not is_trainable)
            klass = cls if cls is not PeftModel else TASK_CLASSES.get(config.task_type or "", PeftModel)
            flags = _grad_flags(model)
            peft_model = klass(
                model,
                config,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=True,
                mixed=mixed,
            )
            try:
                peft_model._load_weights(folder, adapter_name, strict=strict)
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
        low_cpu_mem_usage: bool = False,
        strict: bool = True,
        subfolder: str | None = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Load a saved adapter as ``adapter_name`` beside the ones the model holds."""
        folder = resolve_adapter_folder(model_id, subfolder, revision)
        with reading(folder):
            config = _with_mode(load_config(folder), inference_mode=not is_trainable)
            self.base_model.add_adapter(
                adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=True
            )
            try:
                self._load_weights(folder, adapter_name, strict=strict)
            except BaseException:
                self.base_model.delete_adapter(adapter_name)
                raise
        if not is_trainable:
            self.eval()

    def _load_weights(self, folder: str, adapter_name: str, *, strict: bool) -> None:
        """Read the folder's weights and load them; every check passes before any tensor of the model changes."""
        tensors = load_weights(folder)
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


def _grad_flags(model: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    return [(p, p.requires_grad) for p in model.parameters()]


def _give_back(peft_model: PeftModel, flags: list[tuple[nn.Parameter, bool]]) -> None:
    """Undo a failed load: every adapter out, the user's model as it was given (wrappers, requires_grad)."""
    for name in list(peft_model.peft_config):
        peft_model.base_model.delete_adapter(name)
    for param, flag in flags:
        param.requires_grad_(flag)


def _with_mode(config: AdapterConfig, *, inference_mode: bool) -> AdapterConfig:
    import attrs

    return attrs.evolve(config, inference_mode=inference_mode)


class PeftModelForCausalLM(PeftModel):
    """Decoder-only language models (``task_type="CAUSAL_LM"``)."""

    forward = keyword_forward(LM_INPUTS)


class PeftModelForSeq2SeqLM(PeftModel):
    """Encoder-decoder language models (``task_type="SEQ_2_SEQ_LM"``)."""

    forward = keyword_forward(SEQ2SEQ_INPUTS)


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
        mixed.set_adapter([name for name, _ in found])
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
    """Wrap ``model`` with a new adapter from ``peft_config``; the class follows ``task_type``."""
    if revision is not None:
        import attrs

        peft_config = attrs.evolve(peft_config, revision=revision)
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
    peft_config: AdapterConfig, model: nn.Module, adapter_name: str = DEFAULT, low_cpu_mem_usage: bool = False
) -> nn.Module:
    """Put adapters into ``model`` in place, without a PeftModel wrapper; returns ``model``."""
    AdapterModel(model).add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
    return model


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
