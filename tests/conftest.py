"""Fixtures of the cross-distribution tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import grafting
from grafting.registry import plugins
from tests.toy_methods import ToyPlugin


@pytest.fixture(scope="module")
def toy_methods() -> Iterator[ToyPlugin]:
    """The toy methods of tests/toy_methods.py, registered in-process for one test module."""
    plugin = ToyPlugin()
    grafting.register_plugin(plugin, name="toy-methods")
    yield plugin
    grafting.unregister_plugin(plugin)


@pytest.fixture
def lora_only_registry(monkeypatch: pytest.MonkeyPatch) -> plugins.Registry:
    """A process registry holding only the LoRA plugin, whatever else is installed."""
    import grafting_lora.plugin

    registry = plugins.Registry(load_entry_points=False)
    registry.register(grafting_lora.plugin, name="lora", distribution="grafting-lora")
    monkeypatch.setattr(plugins, "_registry", registry)
    return registry
