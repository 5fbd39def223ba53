"""transformers' ``Trainer`` for grafting models: adapter-only checkpoints in PEFT's format.

``Trainer`` treats a model as an adapter model only when it is a ``peft.PeftModel``;
any other ``nn.Module`` gets the whole model written as ``model.safetensors``,
resumes from that file, and has its dataset columns and label names read from
the wrapper's ``forward(*args, **kwargs)``. :class:`AdapterTrainerMixin` gives a
grafting :class:`~grafting.PeftModel` what peft models get there, through four
of ``Trainer``'s overridable methods, and defers to ``Trainer`` for every other
model::

    from grafting.integrations.transformers import Trainer  # instead of: from transformers import Trainer
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
import transformers
from torch import nn
from transformers.utils import can_return_loss, find_labels

from grafting.api.loading import load_adapter_weights
from grafting.api.mixed import saved_adapters
from grafting.api.peft_model import PeftModel

TRAINING_ARGS_NAME = "training_args.bin"  # what Trainer._save writes beside the model


def adapter_model(model: Any) -> Any:
    """The grafting ``PeftModel`` inside ``model`` (unwrapped from DDP/FSDP/compile), or ``None``."""
    seen = 0
    while not isinstance(model, PeftModel) and seen < 8:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return None
        model, seen = inner, seen + 1
    return model if isinstance(model, PeftModel) else None


class AdapterTrainerMixin:
    """Put before a ``transformers.Trainer`` subclass: ``class MyTrainer(AdapterTrainerMixin, DPOTrainer)``.

    For a grafting model it makes the trainer

    * read dataset columns, label names and loss options from the wrapped model's ``forward``
      (so the default ``remove_unused_columns=True`` keeps the inputs and ``eval_loss`` is computed);
    * save checkpoints and ``save_model`` as ``PeftModel.save_pretrained`` does (the adapters in PEFT's
      format, loadable by grafting and peft) next to the trainer's own state;
    * restore the adapters from such a checkpoint in place for ``resume_from_checkpoint`` and
      ``load_best_model_at_end``, so the optimizer keeps pointing at the trained parameters.
    """

    # Trainer's attributes this mixin reads and sets.
    model: Any
    args: Any
    state: Any
    label_names: Any
    can_return_loss: Any
    model_accepts_loss_kwargs: Any
    _signature_columns: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        peft_model = adapter_model(self.model)
        if peft_model is None:
            return
        wrapped = peft_model.get_base_model()
        if self.args.label_names is None:
            self.label_names = find_labels(type(wrapped))
        self.can_return_loss = can_return_loss(type(wrapped))
        if hasattr(wrapped, "accepts_loss_kwargs"):
            self.model_accepts_loss_kwargs = wrapped.accepts_loss_kwargs
        else:
            params = inspect.signature(wrapped.forward).parameters.values()
            self.model_accepts_loss_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)

    def _set_signature_columns_if_needed(self) -> None:
        peft_model = adapter_model(self.model)
        if peft_model is None or self._signature_columns is not None:
            super()._set_signature_columns_if_needed()  # type: ignore[misc]
            return
        # Trainer (or the subclass after this mixin) reads ``self.model.forward``; let it read the wrapped model's.
        self.model = peft_model.get_base_model()
        try:
            super()._set_signature_columns_if_needed()  # type: ignore[misc]
        finally:
            self.model = peft_model

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        peft_model = adapter_model(self.model)
        if peft_model is None:
            super()._save(output_dir, state_dict)  # type: ignore[misc]
            return
        if state_dict is not None and not self.args.should_save:
            # An already gathered state dict (Trainer under FSDP: accelerate's full state dict, whole on
            # the main process only, empty elsewhere): nothing for this rank to do.
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
        # Without a state dict every rank calls: FSDP2-sharded adapter tensors are gathered, then only the
        # main process writes.
        peft_model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save)
        if not self.args.should_save:
            return
        processing_class = getattr(self, "processing_class", None)
        if processing_class is None:
            processing_class = getattr(getattr(self, "data_collator", None), "tokenizer", None)
        if processing_class is not None:
            processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        peft_model = adapter_model(model if model is not None else self.model)
        if peft_model is None or not _saved_adapters(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
            return
        _restore(peft_model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        peft_model = adapter_model(self.model)
        best = self.state.best_model_checkpoint
        if peft_model is None or best is None or not _saved_adapters(best):
            super()._load_best_model()  # type: ignore[misc]
            return
        _restore(peft_model, best)


def _saved_adapters(folder: str) -> list[tuple[str, str]]:
    return saved_adapters(folder) if os.path.isdir(folder) else []


def _restore(peft_model: Any, folder: str) -> None:
    """Load every adapter saved in ``folder`` into the model's adapter of that name, in place.

    A checkpoint holds what ``save_pretrained`` wrote: ``default`` at the root, other adapters in
    subfolders. An adapter the model does not hold is added (trainable if it is the active one).
    """
    active = peft_model.active_adapters
    for name, sub in _saved_adapters(folder):
        if name in peft_model.peft_config:
            load_adapter_weights(peft_model, sub, name, strict=True)
        else:
            peft_model.load_adapter(sub, name, is_trainable=name in active)
    peft_model.set_adapter(active if len(active) > 1 else active[0])


class Trainer(AdapterTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` that checkpoints, resumes and saves grafting models as adapters."""


class Seq2SeqTrainer(AdapterTrainerMixin, transformers.Seq2SeqTrainer):
    """``transformers.Seq2SeqTrainer`` that checkpoints, resumes and saves grafting models as adapters."""


__all__ = ["AdapterTrainerMixin", "Seq2SeqTrainer", "Trainer", "adapter_model"]
