"""The model-level protocol: adapters that rewrite the model's call instead of wrapping layers."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn


class ModelAdapter(nn.Module):
    """An adapter on the model's inputs (prompt tuning, P-tuning, prefix tuning).

    ``prepare`` receives the keyword arguments of ``PeftModel.forward`` and
    returns the ones to pass to the base model; ``prepare_generate`` does the
    same once for ``generate``, whose steps then run in transformers (what
    the first step needs goes in as ``inputs_embeds`` or a pre-filled cache,
    with the attention mask to match). ``finish`` may post-process the
    outputs. ``peft_state_dict`` names the saved tensors as PEFT does
    (``prompt_embeddings``); ``load_peft_state_dict`` reads them.
    """

    site: ClassVar[str] = "MODEL_INPUTS"
    mergeable: ClassVar[bool] = False

    def prepare(self, kwargs: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        raise NotImplementedError

    def prepare_generate(self, kwargs: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        return self.prepare(kwargs, model)

    def finish(self, outputs: Any, kwargs: dict[str, Any]) -> Any:
        return outputs

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state_dict())

    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state, strict=True, assign=any(p.is_meta for p in self.parameters()))
