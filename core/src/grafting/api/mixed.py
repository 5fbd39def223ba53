"""PeftMixedModel: adapters of several methods, active together; it loads every adapter a folder holds."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from grafting.api.loading import give_back, grad_flags, load_adapter_weights
from grafting.api.peft_model import PeftModel
from grafting.api.saving import DEFAULT
from grafting.config.adapter_config import CONFIG_NAME, AdapterConfig, load_config
from grafting.errors import AdapterLoadError
from grafting.io.transaction import is_bookkeeping


class PeftMixedModel(PeftModel):
    """A model whose adapters may be of different methods, active together (even on one layer)."""

    serves_mixed = True

    def __init__(
        self, model: nn.Module, peft_config: AdapterConfig, adapter_name: str = DEFAULT, **kwargs: Any
    ) -> None:
        kwargs["mixed"] = True
        super().__init__(model, peft_config, adapter_name, **kwargs)

    @classmethod
    def load_every_adapter(cls, model: nn.Module, folder: str, *, is_trainable: bool, strict: bool) -> PeftModel:
        """Load every adapter saved in ``folder`` (the root's and each subfolder's) and activate them all."""
        found = saved_adapters(folder)
        if not found:
            raise AdapterLoadError(
                f"{folder} holds no saved adapter (no adapter_config.json at its root or in a subfolder)"
            )
        (first, first_folder), rest = found[0], found[1:]
        config = load_config(first_folder)
        config.inference_mode = not is_trainable
        flags = grad_flags(model)
        mixed = cls(model, config, first, low_cpu_mem_usage=True)
        try:
            load_adapter_weights(mixed, first_folder, first, strict=strict)
            for name, sub in rest:
                mixed.load_adapter(sub, name, is_trainable=is_trainable, strict=strict)
        except BaseException:
            give_back(mixed, flags)
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


__all__ = ["PeftMixedModel", "saved_adapters"]
