"""Loading a saved adapter's weights into a PeftModel, and undoing a load that failed.

Every check (keys, shapes, the config the weights were saved with) passes before any tensor of
the model changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from grafting.config.adapter_config import AdapterConfig, read_config_file
from grafting.errors import AdapterLoadError
from grafting.io.files import check_pair, load_weights, remap_keys, weights_path
from grafting.io.state_dict import LoadResult, plan_peft_model_state_dict

if TYPE_CHECKING:
    from grafting.api.peft_model import PeftModel


def load_adapter_weights(
    peft_model: PeftModel, folder: str, adapter_name: str, *, strict: bool, key_mapping: dict[str, str] | None = None
) -> LoadResult:
    """Read ``folder``'s weights into adapter ``adapter_name`` (which the model holds, possibly on meta)."""
    tensors = remap_keys(load_weights(folder), key_mapping)
    plan = plan_peft_model_state_dict(peft_model, tensors, adapter_name=adapter_name, source=weights_path(folder))
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
            for path, module in peft_model.base_model.adapter_modules(adapter_name)
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]
            if tensor.is_meta
        ]
        if still_meta:
            raise AdapterLoadError(
                f"{folder}: adapter {adapter_name!r} has tensors the file did not fill (left on the meta device):"
                f" {still_meta[:3]}; a tensor the file does not hold must be created with an explicit device"
            )

    plan.apply(after=filled)
    return result


def checkpoint_key_mapping(
    model: nn.Module, config: AdapterConfig, key_mapping: dict[str, str] | None
) -> dict[str, str] | None:
    """``key_mapping``, else the model's checkpoint conversion mapping (never for a prompt-learning method)."""
    if key_mapping is None and not config.is_prompt_learning:
        mapping: dict[str, str] | None = getattr(model, "_checkpoint_conversion_mapping", None)
        return mapping
    return key_mapping


def grad_flags(model: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    """Each parameter of ``model`` with its ``requires_grad``, to give back after a failed load."""
    return [(p, p.requires_grad) for p in model.parameters()]


def give_back(peft_model: PeftModel, flags: list[tuple[nn.Parameter, bool]]) -> None:
    """Undo a failed load: every adapter out, the user's model as it was given (wrappers, requires_grad)."""
    for name in list(peft_model.peft_config):
        peft_model.base_model.delete_adapter(name)
    for param, flag in flags:
        param.requires_grad_(flag)


def is_checkpointing(model: nn.Module) -> bool:
    """Whether ``model`` has gradient checkpointing on (True for a model that cannot say, as PEFT assumes)."""
    for flag in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5 renamed it
        if flag in dir(type(model)) or flag in model.__dict__:
            return bool(getattr(model, flag))
    return True


__all__ = ["checkpoint_key_mapping", "give_back", "grad_flags", "is_checkpointing", "load_adapter_weights"]
