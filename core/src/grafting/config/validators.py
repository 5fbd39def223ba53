"""attrs converters and validators for config fields, and the adapter-name check.

Each error is a :class:`~grafting.errors.ConfigError` naming ``Class.field`` and the rule. Plugins
use them through :mod:`grafting.toolkit`. They are strict: a bool is a bool (``"false"`` is not
False), numbers are finite and within bounds that keep tensor sizes sane, regexes compile.
"""

from __future__ import annotations

import math
import numbers
import re
import unicodedata
from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import Any, cast

import attrs

from grafting.errors import ConfigError

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]

#: The routing name of the base model in ``adapter_names`` and the empty name: never an adapter's name.
RESERVED_NAMES = frozenset({"", "__base__"})
#: An adapter name becomes a folder name, with room left for a temporary suffix (file systems allow 255 bytes).
MAX_NAME_BYTES = 200
#: The largest count (rank, virtual tokens, dimensions) a config may hold: beyond it tensor sizes overflow.
MAX_COUNT = 2**31 - 1
#: The largest scale factor (``lora_alpha``, ``alpha``) a config may hold.
MAX_SCALE = 2.0**24


# -- adapter names ---------------------------------------------------------------------------------
def check_adapter_name(name: Any) -> str:
    """``name`` if it can name an adapter (and the folder it saves to), else a ConfigError naming the rule.

    An adapter name is a non-empty string of at most :data:`MAX_NAME_BYTES` UTF-8 bytes, without ``.``
    (it would split the state-dict key), ``/`` or ``\\`` (it would name another folder), control or
    line-separator characters, and is not ``__base__`` (the base model in ``adapter_names``).
    """
    if not isinstance(name, str):
        raise ConfigError(f"an adapter name must be a string, got {type(name).__name__} {name!r}")
    if name in RESERVED_NAMES:
        raise ConfigError(f"invalid adapter name {name!r}: the empty name and '__base__' are reserved")
    if "." in name:
        raise ConfigError(f"invalid adapter name {name!r}: it may not contain '.' (state-dict keys are dotted)")
    if "/" in name or "\\" in name:
        raise ConfigError(f"invalid adapter name {name!r}: it may not contain '/' or '\\' (it names a folder)")
    bad = [ch for ch in name if unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp")]
    if bad:
        raise ConfigError(f"invalid adapter name {name!r}: it may not contain control characters ({bad[0]!r})")
    size = len(name.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        raise ConfigError(
            f"invalid adapter name {name[:40]!r}...: {size} bytes in UTF-8, the limit is {MAX_NAME_BYTES}"
            " (it names a folder)"
        )
    return name


def check_adapter_names(names: Iterable[Any]) -> list[str]:
    return [check_adapter_name(n) for n in names]


# -- field validators ------------------------------------------------------------------------------
def _where(instance: Any, attribute: attrs.Attribute) -> str:
    return f"{type(instance).__name__}.{attribute.name}"


def check_count(value: Any, where: str, *, minimum: int = 1) -> None:
    """A ConfigError naming ``where`` unless ``value`` is an integer in ``[minimum, MAX_COUNT]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not minimum <= int(value) <= MAX_COUNT:
        raise ConfigError(f"{where} must be an integer > {minimum - 1}, got {value!r} (the limit is {MAX_COUNT})")


def check_scale(value: Any, where: str) -> None:
    """A ConfigError naming ``where`` unless ``value`` is a finite number in ``(0, MAX_SCALE]``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
        or not 0 < float(value) <= MAX_SCALE
    ):
        raise ConfigError(f"{where} must be a number > 0, got {value!r} (finite, at most {MAX_SCALE:g})")


def positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """A finite real number in ``(0, MAX_SCALE]`` (infinity and NaN refused)."""
    check_scale(value, _where(instance, attribute))


def positive_int(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """An integer in ``[1, MAX_COUNT]`` (not a bool)."""
    check_count(value, _where(instance, attribute))


def probability(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """A dropout-style probability in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"{_where(instance, attribute)} must be in [0, 1), got {value!r}")


def boolean(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """True or False, nothing else (JSON's 1 or "true" are refused)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{_where(instance, attribute)} must be True or False, got {value!r}")


def optional_string(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """A string or None."""
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{_where(instance, attribute)} must be a string or None, got {value!r}")


def _same_choice(value: Any, choice: Any) -> bool:
    """Equal and of the same kind: True is not 1, 1.0 is not 1, None only None."""
    if value is None or choice is None or isinstance(value, bool) or isinstance(choice, bool):
        return value is choice
    same_kind = type(value) is type(choice) or (isinstance(value, str) and isinstance(choice, str))
    return same_kind and value == choice


def one_of(*choices: Any) -> Validator:
    """One of ``choices``, of the same kind (``True`` is not ``1``)."""

    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if not any(_same_choice(value, c) for c in choices):
            raise ConfigError(f"{_where(instance, attribute)} must be one of {list(choices)!r}, got {value!r}")

    return check


def compile_regex(pattern: Any, where: str) -> None:
    """A ConfigError naming ``where`` unless ``pattern`` is a string that compiles as a regex."""
    if not isinstance(pattern, str):
        raise ConfigError(f"{where} must be a string, got {pattern!r}")
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        raise ConfigError(f"{where}: {pattern[:80]!r} is not a valid regular expression ({exc})") from None


def regex_if_string(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """A string value (a regex option such as ``target_modules``) must compile."""
    if isinstance(value, str):
        compile_regex(value, _where(instance, attribute))


def regexes(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """A string, or each string of a list, must compile (``layers_pattern``)."""
    for item in [value] if isinstance(value, str) else (value or []):
        compile_regex(item, _where(instance, attribute))


def module_names(value: Any) -> Any:
    """Converter for a module-name option: a set becomes a sorted list, a tuple a list; the rest is left to check."""
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if isinstance(value, tuple):
        return list(value)
    return value


def names(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """``None``, a regex string that compiles, or a list of module names (with the :func:`module_names` converter)."""
    if value is None:
        return
    if isinstance(value, str):
        compile_regex(value, _where(instance, attribute))
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            f"{_where(instance, attribute)} must be None, a regex string or a list of module names, got {value!r}"
        )


def pattern_of(check: Validator) -> Validator:
    """A dict of module pattern -> value, each key a regex that compiles, each value passing ``check``."""

    def validate(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        where = _where(instance, attribute)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{where} must be a dict of module pattern -> value, got {value!r}")
        for key, item in value.items():
            compile_regex(rf"(.*\.)?({key})$", f"{where} key {key[:80]!r}")  # how the key is matched
            entry = SimpleNamespace(name=f"{attribute.name}[{key!r}]")  # the message names the entry
            check(instance, cast(Any, entry), item)

    return validate
