"""Three toy methods, one per layer site, to test the protocol without a real plugin.

``TOY_DELTA`` adds a full matrix (``y += D x``), ``TOY_OUTPUT`` scales the
output rows (``y ⊙ s``), ``TOY_INPUT`` scales the input (``x ⊙ s``); each can
merge, so a stack of them checks the merge algebra of ARCHITECTURE.md.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch
import torch.nn.functional as F
from torch import nn

import grafting
from grafting import AdapterConfig, DeltaAdapter, InputAdapter, Method, OutputAdapter, hookimpl
from grafting.weights import add_to_weight, in_out_features, is_hf_conv1d, weight_matrix


@attrs.define(kw_only=True)
class ToyDeltaConfig(AdapterConfig):
    peft_type: ClassVar[str] = "TOY_DELTA"
    scale: float = 0.1


@attrs.define(kw_only=True)
class ToyOutputConfig(AdapterConfig):
    peft_type: ClassVar[str] = "TOY_OUTPUT"


@attrs.define(kw_only=True)
class ToyInputConfig(AdapterConfig):
    peft_type: ClassVar[str] = "TOY_INPUT"


def _random(*shape: int, seed: int, scale: float, around: float = 0.0) -> nn.Parameter:
    gen = torch.Generator().manual_seed(seed)
    return nn.Parameter(around + scale * torch.randn(*shape, generator=gen))


class ToyDelta(DeltaAdapter):
    """``delta = D x`` with a dense random ``D``."""

    def __init__(self, base_layer: nn.Module, scale: float, seed: int) -> None:
        super().__init__()
        n_in, n_out = in_out_features(base_layer)
        self.toy_d = _random(n_out, n_in, seed=seed, scale=scale)

    def forward(self, x: torch.Tensor, call: grafting.LayerCall) -> torch.Tensor:
        return F.linear(x.to(self.toy_d.dtype), self.toy_d).to(call.base_out.dtype)

    def merge(self, base_layer: nn.Module) -> None:
        add_to_weight(base_layer, self.toy_d)

    def unmerge(self, base_layer: nn.Module) -> None:
        add_to_weight(base_layer, self.toy_d, alpha=-1.0)


class ToyOutput(OutputAdapter):
    """``y -> y ⊙ s``."""

    def __init__(self, base_layer: nn.Module, seed: int) -> None:
        super().__init__()
        _, n_out = in_out_features(base_layer)
        self.toy_s = _random(n_out, seed=seed, scale=0.2, around=1.0)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return (y * self.toy_s).to(y.dtype)

    @torch.no_grad()
    def merge(self, base_layer: nn.Module) -> None:
        weight_matrix(base_layer).mul_(self.toy_s[:, None])
        if getattr(base_layer, "bias", None) is not None:
            base_layer.bias.mul_(self.toy_s)

    @torch.no_grad()
    def unmerge(self, base_layer: nn.Module) -> None:
        weight_matrix(base_layer).div_(self.toy_s[:, None])
        if getattr(base_layer, "bias", None) is not None:
            base_layer.bias.div_(self.toy_s)


class ToyInput(InputAdapter):
    """``x -> x ⊙ s``."""

    def __init__(self, base_layer: nn.Module, seed: int) -> None:
        super().__init__()
        n_in, _ = in_out_features(base_layer)
        self.toy_s = _random(n_in, seed=seed, scale=0.2, around=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.toy_s).to(x.dtype)

    @torch.no_grad()
    def merge(self, base_layer: nn.Module) -> None:
        weight_matrix(base_layer).mul_(self.toy_s[None, :])

    @torch.no_grad()
    def unmerge(self, base_layer: nn.Module) -> None:
        weight_matrix(base_layer).div_(self.toy_s[None, :])


def _seed(adapter_name: str, module_name: str) -> int:
    return sum(map(ord, adapter_name + module_name))


class ToyPlugin:
    """The three toy methods as one in-process plugin."""

    @hookimpl
    def grafting_methods(self) -> list[Method]:
        return [
            Method(peft_type="TOY_DELTA", name="toy_delta", config_class=ToyDeltaConfig),
            Method(peft_type="TOY_OUTPUT", name="toy_output", config_class=ToyOutputConfig),
            Method(peft_type="TOY_INPUT", name="toy_input", config_class=ToyInputConfig),
        ]

    @hookimpl
    def grafting_create_layer_adapter(
        self, config: Any, base_layer: nn.Module, adapter_name: str, module_name: str
    ) -> nn.Module | None:
        if not (isinstance(base_layer, nn.Linear) or is_hf_conv1d(base_layer)):
            return None
        seed = _seed(adapter_name, module_name)
        if isinstance(config, ToyDeltaConfig):
            return ToyDelta(base_layer, config.scale, seed)
        if isinstance(config, ToyOutputConfig):
            return ToyOutput(base_layer, seed)
        if isinstance(config, ToyInputConfig):
            return ToyInput(base_layer, seed)
        return None
