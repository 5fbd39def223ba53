"""Prompt tuning and P-tuning on the protocol: virtual-token embeddings in front of the input's."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from grafting_prefix import calls
from grafting_prefix.base import VirtualTokenAdapter

#: Tasks whose labels are per input token (the virtual positions get ``-100``).
TOKEN_LABELS = {"CAUSAL_LM"}
#: Tasks whose token_type_ids are kept (zeros for the virtual positions); other tasks drop them.
TOKEN_TYPES_KEPT = {"SEQ_CLS"}
#: Tasks of encoder-decoder models: the prompts go to the encoder, whose input generate does not return.
ENCODER_DECODER = {"SEQ_2_SEQ_LM"}


class PromptAdapter(VirtualTokenAdapter):
    """Prepends ``virtual`` embeddings to the (encoder's) input embeddings.

    forward: ``inputs_embeds = [prompts; embed(input_ids)]``, the attention
    mask gets ones in front; per-token labels (causal LM) get ``-100``;
    ``token_type_ids`` get zeros (classification) or are dropped;
    ``position_ids`` are dropped, so positions count over the whole
    sequence. An encoder-decoder model gets the prompts on the encoder's
    side only (its table has a second block of rows, for the decoder, which
    PEFT saves but does not use). generate: a decoder-only model keeps its
    ``input_ids`` (the output starts with them) and gets the prompted
    embeddings as ``inputs_embeds``, which transformers uses for the first
    step only; later steps read the cache.
    """

    def __init__(
        self, encoder: nn.Module, *, method: str, task_type: str, virtual: int, rows: int, width: int, device: Any
    ) -> None:
        super().__init__(encoder, method=method, rows=rows, width=width, device=device)
        self.task_type = task_type
        self.virtual = virtual

    def _with_prompts(self, kwargs: dict[str, Any], model: nn.Module, *, keep_ids: bool) -> dict[str, Any]:
        kwargs = dict(kwargs)
        ids = kwargs.get("input_ids") if keep_ids else kwargs.pop("input_ids", None)
        embeds = kwargs.pop("inputs_embeds", None)
        if embeds is None:
            if ids is None:
                raise ValueError(f"{self.method}: the call has neither input_ids nor inputs_embeds")
            embeds = calls.input_embeddings(model)(ids)
        batch, n = embeds.shape[0], self.virtual
        prompts = self.tokens()[:n].to(device=embeds.device, dtype=embeds.dtype)
        kwargs["inputs_embeds"] = torch.cat([prompts.unsqueeze(0).expand(batch, -1, -1), embeds], dim=1)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = calls.prefixed(kwargs["attention_mask"], n, 1)
        if self.task_type in TOKEN_TYPES_KEPT and kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = calls.prefixed(kwargs["token_type_ids"], n, 0)
        else:
            calls.drop(kwargs, "token_type_ids", self.method)
        calls.drop(kwargs, "position_ids", self.method)
        return kwargs

    def prepare(self, kwargs: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        out = self._with_prompts(kwargs, model, keep_ids=False)
        if self.task_type in TOKEN_LABELS and out.get("labels") is not None:
            out["labels"] = calls.prefixed(out["labels"], self.virtual, calls.IGNORE_INDEX)
        return out

    def prepare_generate(self, kwargs: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        batch, length, device = calls.input_shape(kwargs)
        kwargs = dict(kwargs)
        if kwargs.get("attention_mask") is None:
            kwargs["attention_mask"] = torch.ones(batch, length, dtype=torch.long, device=device)
        if self.task_type in ENCODER_DECODER:
            return self._with_prompts(kwargs, model, keep_ids=False)
        if kwargs.get("input_ids") is not None:
            _count_new_tokens(kwargs, length)
        return self._with_prompts(kwargs, model, keep_ids=True)


def _count_new_tokens(kwargs: dict[str, Any], length: int) -> None:
    """Turn ``max_length``/``min_length`` into new-token counts.

    With ``inputs_embeds`` longer than ``input_ids`` transformers counts
    those lengths from the embeddings; the user counted from ``input_ids``.
    """
    for total, new in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
        value = kwargs.pop(total, None)
        if value is not None and kwargs.get(new) is None:
            kwargs[new] = max(value - length, 0)
