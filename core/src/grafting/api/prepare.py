"""Getting a model ready to train adapters: quantized (k-bit) bases, gradient checkpointing, mixed precision.

These act on the user's model (a transformers model, or any module with the
same methods) and know no quantization library: a parameter that is not
floating point, or a subclass of ``nn.Parameter`` (bitsandbytes' ``Params4bit``
and ``Int8Params``), is quantized storage and keeps its dtype.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

#: transformers' ``quantization_method`` values whose weights must keep their dtype (PEFT's list).
_KEEP_DTYPE_METHODS = frozenset({"gptq", "aqlm", "eetq", "torchao", "hqq"})


def _quantization_method(model: nn.Module) -> str | None:
    method = getattr(model, "quantization_method", None)
    if getattr(model, "hqq_quantized", False):
        return "hqq"
    return str(getattr(method, "value", method)) if method is not None else None


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds quantized weights: transformers' flags, or a parameter that is quantized storage."""
    flags = ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized")
    if any(getattr(model, flag, False) is True for flag in flags) or _quantization_method(model) is not None:
        return True
    return any(_is_quantized_storage(p) for p in model.parameters())


def _is_quantized_storage(param: torch.Tensor) -> bool:
    return not param.is_floating_point() or type(param) not in (nn.Parameter, torch.Tensor)


def _make_output_require_grad(module: nn.Module, args: Any, output: torch.Tensor) -> None:
    output.requires_grad_(True)


def enable_input_require_grads(model: nn.Module) -> None:
    """Make the input embeddings' output require grad, so gradients reach adapters behind checkpointed blocks."""
    enable = getattr(model, "enable_input_require_grads", None)
    embeddings = getattr(model, "get_input_embeddings", None)
    if callable(enable):
        enable()
    elif callable(embeddings):
        embeddings().register_forward_hook(_make_output_require_grad)


def prepare_model_for_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Enable input grads on a model that is not quantized (PEFT does this when wrapping a checkpointed model)."""
    if not any(
        getattr(model, flag, False) is True for flag in ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized")
    ):
        enable_input_require_grads(model)
    return model


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    auto_clear_cache: bool = True,
) -> nn.Module:
    """Get a quantized (k-bit) model ready for adapter training, in place; returns ``model``.

    Freezes every parameter; casts float16/bfloat16 parameters to float32
    (quantized storage and GPTQ/AQLM/EETQ/torchao/HQQ models excepted), then
    frees the accelerator's cache if ``auto_clear_cache``; for a quantized model
    with ``use_gradient_checkpointing``, makes the input embeddings' output
    require grad (unless ``use_reentrant=False`` is asked, which needs no such
    help) and turns on gradient checkpointing with ``gradient_checkpointing_kwargs``.
    """
    kwargs = dict(gradient_checkpointing_kwargs or {})
    for param in model.parameters():
        param.requires_grad_(False)
    if _quantization_method(model) not in _KEEP_DTYPE_METHODS:
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and not _is_quantized_storage(param):
                param.data = param.data.to(torch.float32)
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()
    if use_gradient_checkpointing and is_quantized(model):
        if kwargs.get("use_reentrant", True):
            enable_input_require_grads(model)
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if enable is None:
            raise TypeError(
                f"{type(model).__name__} has no gradient_checkpointing_enable(); pass use_gradient_checkpointing=False"
            )
        if "gradient_checkpointing_kwargs" in inspect.signature(enable).parameters:
            enable(gradient_checkpointing_kwargs=kwargs)
        else:
            enable()
    return model


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast frozen parameters to ``dtype`` (float16 or bfloat16) and trainable ones to float32, in place.

    The usual set-up for automatic mixed precision: the frozen base in half
    precision, the adapter in full precision. Quantized storage keeps its dtype.
    """
    for param in model.parameters():
        if not _is_quantized_storage(param):
            param.data = param.data.to(dtype if not param.requires_grad else torch.float32)
