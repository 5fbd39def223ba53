"""Shared pieces of the LoRA plugin's option tests: small float64 models, seeded adapters, comparisons."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from grafting.model.routing import BASE
from grafting.testing import assert_close

F64 = torch.float64
#: float64 models: rounding cannot hide a wrong result, and the math allows tight tolerances.
TOL = {"rtol": 1e-9, "atol": 1e-9}


class LayerZoo(nn.Module):
    """An embedding, a Conv1d, a Conv2d, a Conv3d and a linear head in a row, on token ids."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.conv1 = nn.Conv1d(6, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 4, (3, 2), padding=(1, 0), stride=(1, 2))
        self.conv3 = nn.Conv3d(1, 2, 3, padding=1)
        self.head = nn.Linear(2, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv1(self.emb(input_ids).transpose(1, 2)))  # (B, 5, L)
        h = torch.tanh(self.conv2(h.unsqueeze(1)))  # (B, 4, 5, L/2)
        h = torch.tanh(self.conv3(h.unsqueeze(1)))  # (B, 2, 4, 5, L/2)
        return self.head(h.flatten(2).mean(-1))


def zoo(seed: int = 0) -> LayerZoo:
    torch.manual_seed(seed)
    return LayerZoo().to(F64).eval()


def zoo_ids(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 20, (batch, 6), generator=torch.Generator().manual_seed(seed))


def run(model: nn.Module, ids: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=zoo_ids() if ids is None else ids, **kwargs)


def lora_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


@torch.no_grad()
def randomize(model: nn.Module, seed: int, keyword: str = "lora_", scale: float = 0.3) -> None:
    """Seeded values of order ``scale`` for every parameter whose name holds ``keyword`` (in name order)."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted((n, p) for n, p in model.named_parameters() if keyword in n):
        noise = torch.randn(p.shape, generator=gen, dtype=F64) * scale
        p.copy_((1 + noise if "magnitude" in _ else noise).to(p.dtype))


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def peft_config_of(config: Any) -> Any:
    """PEFT's config with the same adapter_config.json content as a grafting config."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_config(config.to_dict())


def assert_moves(actual: torch.Tensor, base: torch.Tensor, what: str = "output") -> None:
    """The adapter changes the output by far more than the comparison tolerance."""
    assert (actual - base).abs().max() > 1e-3, f"{what}: the adapter has no visible effect"


def deepcopy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module)


def assert_merge_round_trip(model: Any, ids: torch.Tensor) -> None:
    """Merging the active adapters keeps the logits (which they move away from the base's);
    unmerging gives back every base tensor."""
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with model.disable_adapter():
            without = model(input_ids=ids).logits
    before = weights_of(model.get_base_model())
    model.merge_adapter()
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    assert_close(merged, expected, changed_from=without, **TOL)
    model.unmerge_adapter()
    for key, value in model.get_base_model().state_dict().items():
        assert_close(value, before[key], **TOL, msg=key)


def assert_rows_route_alone(model: Any, ids: torch.Tensor, names: list[str], **tolerance: float) -> None:
    """Per-sample routing: row ``i`` routed to ``names[i]`` gives that adapter's logits alone on the row
    (``BASE``: adapters off). Leaves the last named adapter active."""
    with torch.no_grad():
        routed = model(input_ids=ids, adapter_names=names).logits
        for i, name in enumerate(names):
            row = ids[i : i + 1]
            if name == BASE:
                with model.disable_adapter():
                    alone = model(input_ids=row).logits
            else:
                model.set_adapter(name)
                alone = model(input_ids=row).logits
            assert_close(routed[i : i + 1], alone, **tolerance, msg=name)
