"""The record a plugin gives for each method it provides."""

from __future__ import annotations

import functools
import importlib.metadata
import json
from importlib import resources
from typing import Any, Literal

import attrs

Level = Literal["layer", "model"]


@attrs.frozen
class Method:
    """A method as its plugin declares it.

    ``peft_type`` is the upper-case name written in adapter_config.json
    (``"LORA"``); ``name`` the short lower-case name (``"lora"``); ``level``
    says whether the method wraps layers or acts on the whole model.
    ``exports`` are further public names of the method that ``grafting``
    resolves lazily, as it does config classes (``grafting.PromptTuningInit``).
    ``hooks`` is the object whose hook implementations serve this method alone
    (a module, class or instance with ``@hookimpl`` functions); ``None`` means the
    plugin that declares the method serves it. The method-scoped hooks of a config
    reach only that object (and plugins that declare no method: extensions), so a
    plugin that declares several methods gives each its own ``hooks``.
    The plugin manager fills ``distribution`` and ``entry_point``.
    """

    peft_type: str = attrs.field(validator=attrs.validators.matches_re(r"[A-Z][A-Z0-9_]*"))
    name: str = attrs.field(validator=attrs.validators.matches_re(r"[a-z][a-z0-9_]*"))
    config_class: type = attrs.field()
    level: Level = attrs.field(default="layer", validator=attrs.validators.in_(("layer", "model")))
    description: str = ""
    exports: dict[str, object] = attrs.field(factory=dict, eq=False, repr=False)
    hooks: object | None = attrs.field(default=None, eq=False, repr=False)
    distribution: str | None = None
    version: str | None = None
    entry_point: str | None = None


#: Entry-point group where any installed distribution names methods it knows how to install:
#: ``LOKR = "grafting-lokr:LoKrConfig"`` (peft_type = "distribution:ConfigName[,OtherConfig]").
KNOWN_METHODS_GROUP = "grafting.known_methods"


@functools.cache
def known_methods() -> dict[str, dict[str, Any]]:
    """For each ``peft_type`` grafting knows of, its distribution and config class names.

    Seeded by ``known_methods.json`` (the first-party plugins) and extended, without
    an edit to the core, by entry points in :data:`KNOWN_METHODS_GROUP`. Only for
    methods that are not installed (install hints, ``grafting.LoraConfig`` resolving
    to an install hint); an installed method's own :class:`Method` record wins.
    """
    text = resources.files("grafting.registry").joinpath("known_methods.json").read_text(encoding="utf-8")
    known = {k: v for k, v in json.loads(text).items() if not k.startswith("_")}
    for ep in importlib.metadata.entry_points(group=KNOWN_METHODS_GROUP):
        distribution, _, configs = ep.value.partition(":")
        if ep.name.upper() not in known and distribution.strip():
            names = [c.strip() for c in configs.split(",") if c.strip()]
            known[ep.name.upper()] = {"distribution": distribution.strip(), "configs": names}
    return known


def distribution_of(peft_type: str) -> str | None:
    """The distribution that provides ``peft_type``, if grafting knows it."""
    return known_methods().get(peft_type, {}).get("distribution")


def peft_type_of_config(class_name: str) -> str | None:
    """The ``peft_type`` of a known config class name (``"LoraConfig"`` -> ``"LORA"``)."""
    for peft_type, entry in known_methods().items():
        if class_name in entry.get("configs", ()):
            return peft_type
    return None
