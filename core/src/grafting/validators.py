"""attrs converters and validators for config fields; each error is a ConfigError naming ``Class.field``."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

import attrs

from grafting.errors import ConfigError

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _where(instance: Any, attribute: attrs.Attribute) -> str:
    return f"{type(instance).__name__}.{attribute.name}"


def positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """A real number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value) > 0:
        raise ConfigError(f"{_where(instance, attribute)} must be a number > 0, got {value!r}")


def positive_int(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """An integer > 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ConfigError(f"{_where(instance, attribute)} must be an integer > 0, got {value!r}")


def probability(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """A dropout-style probability in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"{_where(instance, attribute)} must be in [0, 1), got {value!r}")


def boolean(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """True or False, nothing else (JSON's 1 or "true" are refused)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{_where(instance, attribute)} must be True or False, got {value!r}")


def one_of(*choices: Any) -> Validator:
    """One of ``choices``."""

    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in choices:
            raise ConfigError(f"{_where(instance, attribute)} must be one of {list(choices)!r}, got {value!r}")

    return check


def module_names(value: Any) -> Any:
    """Converter for a module-name option: a set becomes a sorted list, a tuple a list; the rest is left to check."""
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if isinstance(value, tuple):
        return list(value)
    return value


def names(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """``None``, a regex string, or a list of module names (use with the :func:`module_names` converter)."""
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            f"{_where(instance, attribute)} must be None, a regex string or a list of module names, got {value!r}"
        )


def pattern_of(check: Validator) -> Validator:
    """A dict of module pattern -> value, each value passing ``check`` (``rank_pattern={"q_proj": 4}``)."""

    def validate(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{_where(instance, attribute)} must be a dict of module pattern -> value, got {value!r}")
        for key, item in value.items():
            entry = SimpleNamespace(name=f"{attribute.name}[{key!r}]")  # the message names the entry
            check(instance, cast(Any, entry), item)

    return validate
