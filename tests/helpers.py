"""Shared pieces of the cross-distribution tests: base models, configs, the PEFT oracle.

Comparisons are grafting.testing's assert_close and assert_identical (see CONTRIBUTING.md, Numerics).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn

import grafting
from grafting.testing import ARCHITECTURES as ARCHITECTURES
from grafting.testing import ATTENTION_TARGETS as ATTENTION
from grafting.testing import INPUT_EMBEDDINGS as EMBEDDING  # noqa: F401 (for the tests)
from grafting.testing import LINEAR_TARGETS as LINEAR
from grafting.testing import REGEX_TARGETS as REGEX
from grafting.testing import TASK_TYPES as TASK_TYPES
from grafting.testing import UNTIED_EMBEDDINGS as UNTIED_EMBEDDINGS
from grafting.testing import adapter_parameters as adapter_parameters
from grafting.testing import base_logits as base_logits
from grafting.testing import base_model as base_model
from grafting.testing import batch_inputs as inputs  # noqa: F401 (for the tests)
from grafting.testing import logits as logits
from grafting.testing import loss_inputs as loss_inputs
from grafting.testing import oracle_config as peft_config  # noqa: F401 (for the tests)
from grafting.testing import oracle_model as peft_model  # noqa: F401 (for the tests)
from grafting.testing import randomize_adapters as randomize_adapters
from grafting.testing import randomize_named as randomize_named
from grafting.testing import saved_files as files_under  # noqa: F401 (for the tests)
from grafting.testing import state_copy as state_of  # noqa: F401 (for the tests)
from tests.toy_methods import ToyDeltaConfig, ToyInputConfig, ToyOutputConfig, ToySharedConfig

ARCHS = ARCHITECTURES
UNTIED_EMBEDDING = UNTIED_EMBEDDINGS


def toy(arch: str, **kwargs: Any) -> ToyDeltaConfig:
    """A config of the toy method ``TOY_DELTA`` (tests/toy_methods.py) for ``arch``: its attention and task type
    unless given. A test using it registers the toy methods (the ``toy_methods`` fixture)."""
    kwargs.setdefault("target_modules", ATTENTION[arch])
    kwargs.setdefault("task_type", TASK_TYPES[arch])
    return ToyDeltaConfig(**kwargs)


def toy_adapted(
    arch: str, config: Any = None, adapter_name: str = "default", dtype: torch.dtype | None = None, **kwargs: Any
) -> Any:
    """``get_peft_model`` of a toy config (:func:`toy` unless given) on a fresh base of ``arch``."""
    return grafting.get_peft_model(base_model(arch, dtype), config or toy(arch, **kwargs), adapter_name=adapter_name)


@st.composite
def toy_configs(draw: Any, arch: str, **fixed: Any) -> Any:
    """Random toy configs for ``arch``: a method of each site (and the shared-state one), a target set."""
    config_class = draw(st.sampled_from([ToyDeltaConfig, ToyOutputConfig, ToyInputConfig, ToySharedConfig]))
    kind = draw(st.sampled_from(["attention", "linear", "all-linear", "regex"]))
    targets = {"attention": ATTENTION[arch], "linear": LINEAR[arch], "all-linear": "all-linear", "regex": REGEX[arch]}
    kwargs: dict[str, Any] = {"target_modules": targets[kind], "task_type": TASK_TYPES[arch]}
    if config_class is ToyDeltaConfig:
        kwargs["scale"] = draw(st.sampled_from([0.05, 0.1, 0.3]))
    if config_class is ToySharedConfig:
        kwargs["seed"] = draw(st.integers(0, 3))
    kwargs.update(fixed)
    return config_class(**kwargs)


def lora(arch: str, **kwargs: Any) -> Any:
    """A LoraConfig for ``arch`` with its task type; ``init_lora_weights=False`` unless given.

    GPT-2's Conv1D layers store (in, out) weights: its configs say so (``fan_in_fan_out``), as PEFT wants.
    """
    kwargs.setdefault("target_modules", ATTENTION[arch])
    kwargs.setdefault("task_type", TASK_TYPES[arch])
    kwargs.setdefault("init_lora_weights", False)
    kwargs.setdefault("fan_in_fan_out", arch == "gpt2")
    return grafting.LoraConfig(**kwargs)


def adapted(
    arch: str, config: Any = None, adapter_name: str = "default", dtype: torch.dtype | None = None, **kwargs: Any
) -> Any:
    """``get_peft_model`` on a fresh base of ``arch`` (in ``dtype`` if given)."""
    return grafting.get_peft_model(base_model(arch, dtype), config or lora(arch, **kwargs), adapter_name=adapter_name)


# -- non-trivial adapters -------------------------------------------------------------------


def adapter_params(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """Parameters that belong to adapters (and modules_to_save copies), by name."""
    return adapter_parameters(model, adapter_name, modules_to_save=True)


def base_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n not in adapter_params(model)}


def randomize(model: nn.Module, seed: int = 0, adapter_name: str | None = None, scale: float = 0.3) -> None:
    """Add seeded noise to every adapter parameter (A, B, magnitudes, saved heads) so none is trivial."""
    randomize_adapters(model, seed, adapter_name, scale, modules_to_save=True)


# -- files -----------------------------------------------------------------------------------------
def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# -- the PEFT oracle (tests only) ---------------------------------------------------------------------
@functools.cache
def peft_lora_keys() -> frozenset[str]:
    import peft

    return frozenset(peft.LoraConfig().to_dict())


def iter_archs() -> Iterator[str]:
    yield from ARCHS
