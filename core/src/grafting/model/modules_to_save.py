"""Trainable copies of whole modules (a classification head, say), one per adapter."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from grafting.errors import UnsupportedLayerError
from grafting.model.routing import current_routing


class ModulesToSaveWrapper(nn.Module):
    """Holds the ``original_module`` and a trainable copy per adapter in ``modules_to_save``."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False

    def add_copy(self, name: str, tied_to: ModulesToSaveWrapper | None = None) -> None:
        """A trainable copy for adapter ``name``; ``tied_to``: the wrapper of a module whose parameters the
        original shares (a head tied to the input embedding), whose copies of them this copy shares too."""
        memo: dict[int, Any] = {}
        if tied_to is not None:
            partner = tied_to.modules_to_save[name]
            for original, trained in zip(tied_to.original_module.parameters(), partner.parameters(), strict=True):
                memo[id(original)] = trained
        clone = copy.deepcopy(self.original_module, memo)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = clone

    def set_active(self, names: list[str] | tuple[str, ...]) -> None:
        chosen = [n for n in names if n in self.modules_to_save]
        self.active = chosen[0] if chosen else None

    def __getattr__(self, name: str) -> Any:
        """What the wrapper lacks (``weight``, ``bias``, ``in_features``) is the module in use's, as in PEFT.

        TRL's fused LM head reads ``get_output_embeddings().weight``: with ``lm_head`` in
        ``modules_to_save`` that is the active adapter's copy, the one forward runs.
        """
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "original_module" not in modules or "modules_to_save" not in modules:  # still being built
                raise
        active = self.__dict__.get("active")
        in_use = modules["original_module"]
        if active is not None and not self.__dict__.get("disabled", False):
            in_use = modules["modules_to_save"][active]
        return getattr(in_use, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled:
            return self.original_module(*args, **kwargs)
        routing = current_routing()
        if routing is not None and args:
            out = self.original_module(*args, **kwargs)
            if not isinstance(out, torch.Tensor) or not isinstance(args[0], torch.Tensor):
                raise UnsupportedLayerError(
                    f"per-sample adapter_names cannot route the batch through modules_to_save copies of"
                    f" {type(self.original_module).__name__}: it returns a {type(out).__name__}, not one tensor"
                    " with the batch first; run those samples in separate calls"
                )
            for name in routing.adapter_names:
                if name in self.modules_to_save:
                    rows = routing.rows(name, out.device)
                    value = self.modules_to_save[name](args[0][rows], *args[1:], **kwargs)
                    out = out.index_copy(0, rows, value.to(out.dtype))
            return out
        module = self.original_module if self.active is None else self.modules_to_save[self.active]
        return module(*args, **kwargs)
