"""Keyword forward signatures for the task classes, with the inputs PEFT's task classes declare.

Libraries read a model's inputs from its ``forward`` signature: transformers'
``Trainer`` keeps the dataset columns it names and takes the parameters with
"label" in their name as the label names (from the *class*, so an instance
cannot tell it more). A wrapper whose forward is ``(*args, **kwargs)`` names
nothing. Each task class therefore declares the inputs PEFT's class for the task
declares (:data:`grafting.config.tasks.TASKS`), plus ``**kwargs`` for everything else
the wrapped model takes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


def keyword_forward(names: tuple[str, ...], run: Callable[..., Any]) -> Callable[..., Any]:
    """A ``forward(self, <names>=None ..., **kwargs)`` that calls ``run(self, **inputs)`` with keywords only.

    Positional arguments bind to ``names`` in order (PEFT's behaviour); an input left at ``None``
    is not passed on, so the wrapped model sees the same call as through ``run`` (``PeftModel.forward``).
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
        bound = signature.bind(self, *args, **kwargs).arguments
        call = {name: bound[name] for name in names if bound.get(name) is not None}
        call.update(bound.get("kwargs", {}))
        return run(self, **call)

    forward.__signature__ = signature  # type: ignore[attr-defined]
    forward.__doc__ = f"Run the wrapped model with the active adapters; inputs as PEFT names them: {', '.join(names)}."
    return forward
