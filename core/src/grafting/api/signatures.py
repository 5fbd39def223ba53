"""Keyword forward signatures for the task classes, the inputs PEFT's task classes declare.

Libraries read a model's inputs from its ``forward`` signature: transformers'
``Trainer`` keeps the dataset columns it names and takes the parameters with
"label" in their name as the label names (from the *class*, so an instance
cannot tell it more). A wrapper whose forward is ``(*args, **kwargs)`` names
nothing. Each task class therefore declares the inputs PEFT's class for the task
declares, plus ``**kwargs`` for everything else the wrapped model takes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

_COMMON_TAIL = ("output_attentions", "output_hidden_states", "return_dict", "task_ids")
LM_INPUTS = ("input_ids", "attention_mask", "inputs_embeds", "labels", *_COMMON_TAIL)
SEQ2SEQ_INPUTS = (
    "input_ids",
    "attention_mask",
    "inputs_embeds",
    "decoder_input_ids",
    "decoder_attention_mask",
    "decoder_inputs_embeds",
    "labels",
    *_COMMON_TAIL,
)
QA_INPUTS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "position_ids",
    "inputs_embeds",
    "start_positions",
    "end_positions",
    *_COMMON_TAIL,
)
FEATURE_INPUTS = ("input_ids", "attention_mask", "inputs_embeds", *_COMMON_TAIL)


def keyword_forward(names: tuple[str, ...]) -> Callable[..., Any]:
    """A ``forward(self, <names>=None ..., **kwargs)`` that calls ``PeftModel.forward`` with keywords only.

    Positional arguments bind to ``names`` in order (PEFT's behaviour); an input left at ``None``
    is not passed on, so the wrapped model sees the same call as through ``PeftModel.forward``.
    """
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    signature = inspect.Signature(
        [
            inspect.Parameter("self", kind),
            *(inspect.Parameter(name, kind, default=None) for name in names),
            inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
        ]
    )

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        from grafting.api.peft_model import PeftModel

        bound = signature.bind(self, *args, **kwargs).arguments
        call = {name: bound[name] for name in names if bound.get(name) is not None}
        call.update(bound.get("kwargs", {}))
        return PeftModel.forward(self, **call)

    forward.__signature__ = signature  # type: ignore[attr-defined]
    forward.__doc__ = f"Run the wrapped model with the active adapters; inputs as PEFT names them: {', '.join(names)}."
    return forward
