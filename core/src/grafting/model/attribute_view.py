"""PEFT's per-adapter attributes on an adapted layer (``layer.lora_A["default"]``), as views over its adapters.

PEFT keeps each adapter's tensors and settings in dicts on the layer, keyed by adapter name;
grafting keeps one module per adapter (``layer.adapters[name]``) that holds them under the same
names. Each layer-adapter class declares the names PEFT users read
(:attr:`grafting.protocol.LayerAdapter.peft_attributes`), and the layer answers such a name with an
:class:`AdapterAttributeView`: the adapters' own objects, never copies, so reads and in-place writes
reach what grafting trains.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from torch import nn


def declares(adapter: nn.Module, name: str) -> bool:
    """Whether ``adapter``'s class lists ``name`` among the PEFT attributes it answers."""
    return name in getattr(type(adapter), "peft_attributes", ())


class AdapterAttributeView(Mapping[str, Any]):
    """A read-only mapping ``{adapter name: adapter.<name>}`` over the layer's adapters that declare and hold ``name``.

    Live: adapters added or deleted later appear or disappear. Like PEFT's ``ModuleDict``, a missing
    key is a ``KeyError`` and ``view.<adapter>`` reads one entry.
    """

    __slots__ = ("_adapters", "_name")

    def __init__(self, adapters: nn.ModuleDict, name: str) -> None:
        self._adapters = adapters
        self._name = name

    def _entries(self) -> dict[str, Any]:
        entries = {}
        for adapter_name, adapter in self._adapters.items():
            value = getattr(adapter, self._name, None) if declares(adapter, self._name) else None
            if value is not None:
                entries[adapter_name] = value
        return entries

    def __getitem__(self, key: str) -> Any:
        entries = self._entries()
        if key not in entries:
            raise KeyError(f"no adapter {key!r} has {self._name!r} on this layer; adapters with it: {sorted(entries)}")
        return entries[key]

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        try:
            return self[key]
        except KeyError as error:
            raise AttributeError(error.args[0]) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries())

    def __len__(self) -> int:
        return len(self._entries())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._name!r}, {self._entries()!r})"


def attribute_view(adapters: nn.ModuleDict, name: str) -> AdapterAttributeView | None:
    """The view for ``name`` when an adapter on the layer declares it, else ``None``."""
    if any(declares(adapter, name) for adapter in adapters.values()):
        return AdapterAttributeView(adapters, name)
    return None
