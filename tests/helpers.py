"""Shared pieces of the cross-distribution tests: base models, configs, the PEFT oracle.

Comparisons are grafting.testing's assert_close and assert_identical (see CONTRIBUTING.md, Numerics).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn

import grafting
from grafting.testing import ARCHITECTURES, model_output, sample_inputs, tiny_model

ARCHS = ARCHITECTURES

TASK_TYPES: dict[str, str] = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}

#: Target sets per architecture: a few attention projections, every linear layer by name, a regex.
ATTENTION: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "t5": ["q", "v"],
}
LINEAR: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "key", "value", "dense"],
    "t5": ["q", "k", "v", "o", "wi", "wo"],
}
REGEX: dict[str, str] = {
    "llama": r".*\.layers\.1\.(self_attn\.(k|o)_proj|mlp\.up_proj)",
    "gpt2": r".*\.h\.\d+\.mlp\.c_(fc|proj)",
    "bert": r".*encoder\.layer\.\d+\.(attention\.self\.key|output\.dense)",
    "t5": r"(encoder|decoder)\.block\.0\..*\.(k|wo)",
}
#: The input embedding of each model. GPT-2 and T5 tie it to the output head.
EMBEDDING: dict[str, str] = {
    "llama": "embed_tokens",
    "gpt2": "wte",
    "bert": "word_embeddings",
    "t5": "embed_tokens",
}
#: Architectures whose input embedding is its own weight (merging into it changes nothing else).
UNTIED_EMBEDDING = ("llama", "bert")


@functools.cache
def _base(arch: str) -> nn.Module:
    return tiny_model(arch)


def base_model(arch: str, dtype: torch.dtype | None = None) -> nn.Module:
    """A fresh copy of the seeded tiny model of ``arch`` (built once per process), in ``dtype`` if given.

    Checks of merging and routing run in float64, where float32's rounding, which random
    adapters amplify, cannot hide a wrong result or fake one.
    """
    model = copy.deepcopy(_base(arch))
    return model if dtype is None else model.to(dtype)


def inputs(arch: str, batch: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    return sample_inputs(arch, batch=batch, length=5, seed=seed)


def logits(model: nn.Module, arch: str, batch: int = 3, **kwargs: Any) -> torch.Tensor:
    return model_output(model, {**inputs(arch, batch), **kwargs})


def base_logits(arch: str, batch: int = 3, dtype: torch.dtype | None = None) -> torch.Tensor:
    return logits(_base(arch) if dtype is None else base_model(arch, dtype), arch, batch)


def lora(arch: str, **kwargs: Any) -> Any:
    """A LoraConfig for ``arch`` with its task type; ``init_lora_weights=False`` unless given.

    GPT-2's Conv1D layers store (in, out) weights: its configs say so (``fan_in_fan_out``), as PEFT wants.
    """
    kwargs.setdefault("target_modules", ATTENTION[arch])
    kwargs.setdefault("task_type", TASK_TYPES[arch])
    kwargs.setdefault("init_lora_weights", False)
    kwargs.setdefault("fan_in_fan_out", arch == "gpt2")
    return grafting.LoraConfig(**kwargs)


def loss_inputs(arch: str) -> dict[str, torch.Tensor]:
    """:func:`inputs` with labels, for a real loss."""
    batch = inputs(arch)
    if arch == "bert":
        batch["labels"] = torch.tensor([0, 2, 1])
    elif arch == "t5":
        batch["labels"] = batch["decoder_input_ids"]
    else:
        batch["labels"] = batch["input_ids"]
    return batch


def adapted(
    arch: str, config: Any = None, adapter_name: str = "default", dtype: torch.dtype | None = None, **kwargs: Any
) -> Any:
    """``get_peft_model`` on a fresh base of ``arch`` (in ``dtype`` if given)."""
    return grafting.get_peft_model(base_model(arch, dtype), config or lora(arch, **kwargs), adapter_name=adapter_name)


# -- non-trivial adapters -------------------------------------------------------------------
ADAPTER_KEYS = ("lora_", "modules_to_save")


def adapter_params(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """Parameters that belong to adapters (and modules_to_save copies), by name."""
    out = {}
    for name, p in model.named_parameters():
        owned = ".adapters." in name or ".modules_to_save." in name
        if owned and (adapter_name is None or f".{adapter_name}." in name):
            out[name] = p
    return out


def base_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n not in adapter_params(model)}


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0, adapter_name: str | None = None, scale: float = 0.3) -> None:
    """Add seeded noise to every adapter parameter (A, B, magnitudes, saved heads) so none is trivial."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(adapter_params(model, adapter_name).items()):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * scale
        p.add_(noise.to(p.dtype))


@torch.no_grad()
def randomize_named(model: nn.Module, keyword: str, seed: int = 0, scale: float = 0.3) -> None:
    """Like :func:`randomize`, for any parameter whose name contains ``keyword`` (PEFT models)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if keyword in name:
            p.add_((torch.randn(p.shape, generator=gen) * scale).to(p.dtype))


# -- states --------------------------------------------------------------------------------------
def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# -- files -----------------------------------------------------------------------------------------
def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def files_under(folder: str | os.PathLike[str]) -> list[str]:
    """The files of a saved folder, less the save lock grafting keeps there (``grafting.io.transaction``)."""
    from grafting.io.transaction import is_bookkeeping

    out = []
    for root, _, names in os.walk(folder):
        out += [os.path.relpath(os.path.join(root, n), folder) for n in names if not is_bookkeeping(n)]
    return sorted(out)


# -- the PEFT oracle (tests only) ---------------------------------------------------------------------
def peft_config(config: Any) -> Any:
    """The PEFT config with the same adapter_config.json content as a grafting config."""
    import peft

    data = config.to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_config(data)


def peft_model(arch: str, config: Any, adapter_name: str = "default") -> Any:
    import peft

    return peft.get_peft_model(base_model(arch), peft_config(config), adapter_name=adapter_name)


@functools.cache
def peft_lora_keys() -> frozenset[str]:
    import peft

    return frozenset(peft.LoraConfig().to_dict())


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


def iter_archs() -> Iterator[str]:
    yield from ARCHS
