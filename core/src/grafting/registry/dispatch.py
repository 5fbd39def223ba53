"""Configs by ``peft_type``: the installed method's class reads an adapter_config.json dict."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from grafting.errors import ConfigError, UnknownMethodError
from grafting.registry.plugins import get_method

if TYPE_CHECKING:
    from grafting.config.adapter_config import AdapterConfig


def config_from_dict(data: dict[str, Any], *, source: str = "config") -> AdapterConfig:
    """Build the right method's config from a dict with a ``peft_type``."""
    if "peft_type" not in data:
        raise ConfigError(f"{source}: no peft_type given")
    if not isinstance(data["peft_type"], str):
        raise ConfigError(f"{source}: field peft_type must be a string, got {data['peft_type']!r}")
    try:
        method = get_method(data["peft_type"])
    except UnknownMethodError as exc:
        raise UnknownMethodError(f"{source}: field peft_type: {exc}") from None
    config_class: type[AdapterConfig] = method.config_class
    return config_class.from_dict(data, source=source)


def get_peft_config(config_dict: dict[str, Any]) -> AdapterConfig:
    """PEFT's name for :func:`config_from_dict`."""
    return config_from_dict(config_dict)
