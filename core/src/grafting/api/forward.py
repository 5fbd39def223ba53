"""A PeftModel's call: per-sample routing (``adapter_names``) and the active model-level adapter."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from grafting.errors import AdapterNotFoundError, AdapterStateError
from grafting.model.routing import BASE, route_samples

if TYPE_CHECKING:
    from grafting.api.peft_model import PeftModel


@contextlib.contextmanager
def routing(peft_model: PeftModel, adapter_names: list[str] | None) -> Iterator[None]:
    """Route each sample of the batch to its adapter (``None``: no routing) within the block."""
    if adapter_names is None:
        yield
        return
    unknown = sorted({n for n in adapter_names if n != BASE and n not in peft_model.peft_config})
    if unknown:
        raise AdapterNotFoundError(f"adapter_names names adapters the model does not hold: {unknown}")
    with route_samples(adapter_names):
        yield


def call_model(peft_model: PeftModel, fn: Any, args: tuple, kwargs: dict[str, Any], *, generate: bool = False) -> Any:
    """Call ``fn`` (the model's forward or generate) with the active adapters and the call's routing."""
    adapter_names = kwargs.pop("adapter_names", None)
    model_adapter = peft_model.base_model.active_model_adapter()
    if model_adapter is not None and adapter_names is not None:
        raise AdapterStateError(
            "adapter_names cannot route samples while a model-level adapter is active: it changes the"
            " whole batch's inputs"
        )
    with routing(peft_model, adapter_names):
        if model_adapter is None:
            return fn(*args, **kwargs)
        if args:
            kwargs["input_ids"], args = args[0], args[1:]
        prepare = model_adapter.prepare_generate if generate else model_adapter.prepare
        prepared = prepare(kwargs, peft_model.base_model.model)
        return model_adapter.finish(fn(*args, **prepared), prepared)
