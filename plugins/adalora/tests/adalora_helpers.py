"""Shared pieces of the AdaLoRA plugin's tests: float64 tiny models, seeded factors, a training loop."""

from __future__ import annotations

from typing import Any

import peft
import torch
from torch import nn

from grafting.testing import model_output, sample_inputs, tiny_model

F64 = torch.float64
ARCHS = ["llama", "gpt2"]
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def base(arch: str, seed: int = 0) -> nn.Module:
    return tiny_model(arch, seed=seed).to(F64)


def inputs(arch: str, seed: int = 0, batch: int = 2) -> dict[str, torch.Tensor]:
    return sample_inputs(arch, batch=batch, length=5, seed=seed)


def output(model: nn.Module, arch: str, seed: int = 0) -> torch.Tensor:
    return model_output(model, inputs(arch, seed))


def options(arch: str, **overrides: Any) -> dict[str, Any]:
    """An AdaLoRA config's options, the same for PEFT's and grafting's class."""
    kwargs: dict[str, Any] = {
        "init_r": 4,
        "target_r": 2,
        "lora_alpha": 6,
        "tinit": 1,
        "tfinal": 2,
        "deltaT": 1,
        "total_step": 8,
        "target_modules": TARGETS[arch],
        "init_lora_weights": False,
        "task_type": "CAUSAL_LM",  # PEFT adds the orthogonality term only in its task classes' forward
    }
    kwargs.update(overrides)
    return kwargs


def factors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every lora_A/lora_B/lora_E of a grafting or PEFT model, keyed as PEFT saves them."""
    out = {}
    for name, p in model.named_parameters():
        for factor in ("lora_A", "lora_B", "lora_E"):
            if f".{factor}." in name or name.endswith(f".{factor}"):
                out[peft_key(name, factor)] = p
    return out


def peft_key(name: str, factor: str) -> str:
    """``<path>.<factor>``: grafting's ``<path>.adapters.<name>.<factor>`` or PEFT's ``<path>.<factor>.<name>``."""
    path = name.split(".adapters.")[0] if ".adapters." in name else name.split(f".{factor}.")[0]
    path = path.removeprefix("base_model.model.")
    return f"{path}.{factor}"


@torch.no_grad()
def randomize(model: nn.Module, seed: int, scale: float = 0.3) -> None:
    """Seeded values for every factor (E included, so every rank matters)."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(factors(model).items()):
        p.copy_((torch.randn(p.shape, generator=gen, dtype=F64) * scale).to(p.dtype))


def train(model: nn.Module, arch: str, steps: range, lr: float = 0.05) -> list[float]:
    """SGD steps on a causal-LM loss, calling ``update_and_allocate`` as PEFT's docs say; the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)
    losses = []
    for step in steps:
        batch = inputs(arch, seed=step)
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


TOL = {"rtol": 1e-10, "atol": 1e-10}  # float64 against float64


def peft_model(arch: str, seed: int = 1, **overrides: object) -> Any:
    model = peft.get_peft_model(base(arch), peft.AdaLoraConfig(**options(arch, **overrides)))
    randomize(model, seed)
    for name, p in model.named_parameters():
        if ".ranknum." in name:
            # PEFT 0.21 leaves ranknum requiring grad, so an optimizer over the trainable parameters
            # trains it, yet never saves it: its own reload then differs. grafting keeps it fixed.
            assert p.requires_grad, "PEFT no longer trains ranknum: drop this"
            p.requires_grad_(False)
    return model


def pattern(model: object) -> dict[str, list[bool]]:
    """A model's rank_pattern with PEFT's in-memory adapter suffix dropped, as both save it."""
    found = model.peft_config["default"].rank_pattern or {}  # type: ignore[attr-defined]
    return {k.removesuffix(".default"): v for k, v in found.items()}
