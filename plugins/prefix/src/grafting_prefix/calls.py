"""Small rewrites of a model call's keyword arguments, shared by the virtual-token adapters."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from torch import nn

from grafting import GraftingWarning

#: transformers 5.x renamed ``past_key_values`` to ``cache``; both are read, the model's own is passed.
CACHE_NAMES = ("cache", "past_key_values")
IGNORE_INDEX = -100


def input_shape(kwargs: dict[str, Any]) -> tuple[int, int, torch.device]:
    """(batch, length, device) of the call's ``input_ids`` or ``inputs_embeds``."""
    for key in ("input_ids", "inputs_embeds"):
        value = kwargs.get(key)
        if value is not None:
            return value.shape[0], value.shape[1], value.device
    raise ValueError("the call has neither input_ids nor inputs_embeds")


def prefixed(tensor: torch.Tensor, n: int, fill: int | float) -> torch.Tensor:
    """``tensor`` (batch, length) with ``n`` columns of ``fill`` in front."""
    front = torch.full((tensor.shape[0], n), fill, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([front, tensor], dim=1)


def drop(kwargs: dict[str, Any], key: str, method: str) -> None:
    """Remove ``key`` from the call, with a warning if it held a value."""
    if kwargs.pop(key, None) is not None:
        warnings.warn(f"{method} ignores {key}, as PEFT does", GraftingWarning, stacklevel=4)


def _named_cache(module: nn.Module) -> str | None:
    """The name under which ``module.forward`` lists a key/value cache, or ``None``."""
    params = _parameters(module)
    return next((name for name in CACHE_NAMES if name in params), None)


def _parameters(module: nn.Module) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return {}


def backbone_route(model: nn.Module) -> tuple[nn.Module, str] | None:
    """``(backbone, cache name)`` when ``model`` takes no cache itself but hands its keywords to one that does.

    transformers 5's task heads (``BertForSequenceClassification``, ...) list no
    cache but pass ``**kwargs`` on to their backbone (``model.base_model``),
    whose forward takes one: the prefix travels that way.
    """
    backbone = getattr(model, "base_model", None)
    if not isinstance(backbone, nn.Module) or backbone is model:
        return None
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in _parameters(model).values()):
        return None
    name = _named_cache(backbone)
    return None if name is None else (backbone, name)


def cache_argument(model: nn.Module) -> str | None:
    """The keyword under which a call of ``model`` gets a key/value cache to its attention, or ``None``."""
    own = _named_cache(model)
    if own is not None:
        return own
    route = backbone_route(model)
    return None if route is None else route[1]


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove and return the call's cache, whichever name it came under."""
    found = None
    for name in CACHE_NAMES:
        value = kwargs.pop(name, None)
        if value is not None:
            found = value
    return found


def model_dtype(model: nn.Module, fallback: torch.dtype) -> torch.dtype:
    """The floating dtype the model computes in."""
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else fallback


def input_embeddings(model: nn.Module) -> nn.Module:
    """The model's input embedding layer."""
    layer = model.get_input_embeddings()  # type: ignore[operator]
    assert isinstance(layer, nn.Module)
    return layer


def vocabulary_size(model: nn.Module) -> int:
    """Rows of the model's input embedding matrix."""
    weight = input_embeddings(model).weight
    assert isinstance(weight, torch.Tensor)
    return weight.shape[0]
