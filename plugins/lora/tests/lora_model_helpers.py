"""Helpers of the LoRA plugin's model-level tests: tiny seeded models, LoRA configs drawn by hypothesis,
random adapters, and the PEFT oracle (the tests' own copy, so the plugin's tests need nothing of the
repository's root ``tests`` package)."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn

import grafting
from grafting.testing import ARCHITECTURES as ARCHITECTURES
from grafting.testing import ATTENTION_TARGETS as ATTENTION
from grafting.testing import INPUT_EMBEDDINGS as EMBEDDING
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
from grafting.testing import state_copy as state_of  # noqa: F401 (for the tests)

ARCHS = ARCHITECTURES
UNTIED_EMBEDDING = UNTIED_EMBEDDINGS


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


def randomize(model: nn.Module, seed: int = 0, adapter_name: str | None = None, scale: float = 0.3) -> None:
    """Add seeded noise to every adapter parameter (A, B, magnitudes, saved heads) so none is trivial."""
    randomize_adapters(model, seed, adapter_name, scale, modules_to_save=True)


@st.composite
def lora_configs(draw: Any, arch: str, *, embeddings: bool = True, dora: bool = True, **fixed: Any) -> Any:
    """Random small LoRA configs for ``arch``: rank, alpha, rsLoRA, DoRA, target set."""
    choices = ["attention", "linear", "all-linear", "regex"]
    if embeddings:
        choices.append("embedding")
    kind = draw(st.sampled_from(choices))
    targets: Any = {
        "attention": ATTENTION[arch],
        "linear": LINEAR[arch],
        "all-linear": "all-linear",
        "regex": REGEX[arch],
        "embedding": [*ATTENTION[arch], EMBEDDING[arch]],
    }[kind]
    use_dora = draw(st.booleans()) if dora and kind != "embedding" else False
    kwargs = {
        "r": draw(st.integers(1, 6)),
        "lora_alpha": draw(st.sampled_from([1, 2, 3.5, 8, 16])),
        "use_rslora": draw(st.booleans()),
        "use_dora": use_dora,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": draw(st.sampled_from(["none", "none", "all", "lora_only"])),
    }
    if draw(st.booleans()):  # per-module ranks and alphas, keyed by a leaf name or a regex
        leaves = st.sampled_from([*LINEAR[arch][:3], rf"\w+\.0\.\w+\.{LINEAR[arch][0]}"])
        kwargs["rank_pattern"] = draw(st.dictionaries(leaves, st.integers(1, 5), max_size=2))
        kwargs["alpha_pattern"] = draw(st.dictionaries(leaves, st.sampled_from([1, 4, 12.5]), max_size=2))
    kwargs.update(fixed)
    return lora(arch, **kwargs)
