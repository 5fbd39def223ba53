"""Three toy methods, one per layer site, to test the protocol without a real plugin.

``TOY_DELTA`` adds a full matrix (``y += D x``), ``TOY_OUTPUT`` scales the
output rows (``y ⊙ s``), ``TOY_INPUT`` scales the input (``x ⊙ s``); each can
merge, so a stack of them checks the merge algebra of ARCHITECTURE.md.
``TOY_SHARED`` adds ``v ⊙ (M x)`` with one bank ``M`` shared by every layer of
the adapter (sized by the largest target, sliced per layer, VeRA's pattern).
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch
import torch.nn.functional as F
from torch import nn

import grafting
from grafting import AdapterConfig, DeltaAdapter, InputAdapter, Method, OutputAdapter, SharedState, hookimpl
from grafting.model.weights import add_to_weight, in_out_features, is_hf_conv1d, weight_matrix
from grafting.toolkit import fit_state


@attrs.define(kw_only=True)
class ToyDeltaConfig(AdapterConfig):
    peft_type: ClassVar[str] = "TOY_DELTA"
    scale: float = 0.1
    reads_base_weight: bool = False  # declare, as DoRA does, that merging reads the layer's own weight


@attrs.define(kw_only=True)
class ToyOutputConfig(AdapterConfig):
    peft_type: ClassVar[str] = "TOY_OUTPUT"


@attrs.define(kw_only=True)
class ToyInputConfig(AdapterConfig):
    peft_type: ClassVar[str] = "TOY_INPUT"


@attrs.define(kw_only=True)
class ToySharedConfig(AdapterConfig):
    peft_type: ClassVar[str] = "TOY_SHARED"
    seed: int = 0
    save_bank: bool = True  # False: a non-persistent buffer, regenerated from the seed
    bank_device: str | None = "cpu"  # None: no explicit device (left on meta when loading: a plugin bug)
    train_bank: bool = False  # a trained parameter instead of a frozen buffer


def _random(*shape: int, seed: int, scale: float, around: float = 0.0) -> nn.Parameter:
    gen = torch.Generator().manual_seed(seed)
    return nn.Parameter(around + scale * torch.randn(*shape, generator=gen))


class ToyDelta(DeltaAdapter):
    """``delta = D x`` with a dense random ``D``."""

    def __init__(self, base_layer: nn.Module, scale: float, seed: int, reads_base_weight: bool = False) -> None:
        super().__init__()
        n_in, n_out = in_out_features(base_layer)
        self.toy_d = _random(n_out, n_in, seed=seed, scale=scale)
        self.reads_base_weight = reads_base_weight

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

    # hot-swap, as a third-party method may take part in it: no rank, the scale copied; no hotswap_blank_values
    def pad_rank(self, rank: int) -> None:
        """Nothing to grow: the scale spans the layer's outputs."""

    def hotswap_values(self, tensors: dict[str, torch.Tensor], config: Any, module_name: str) -> dict[str, Any]:
        return fit_state(self, tensors, fixed="the scale spans the layer's outputs")

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


class ToyBank(SharedState):
    """One random matrix ``toy_bank`` as large as the largest target, shared by the adapter's layers."""

    def __init__(
        self, targets: dict[str, nn.Module], seed: int, save: bool, device: str | None, train: bool = False
    ) -> None:
        super().__init__()
        sizes = [in_out_features(layer) for layer in targets.values()]
        n_in, n_out = max(s[0] for s in sizes), max(s[1] for s in sizes)
        bank = torch.empty(n_out, n_in, device=device)
        if not bank.is_meta:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            bank.copy_(0.2 * torch.randn(n_out, n_in, generator=gen, device="cpu"))  # explicit: see the meta rule
        if train:
            self.toy_bank = nn.Parameter(bank)
        else:
            self.register_buffer("toy_bank", bank, persistent=save)


class ToySharedDelta(DeltaAdapter):
    """``delta = v ⊙ (M[:out, :in] x)`` with the adapter's shared bank ``M``."""

    def __init__(self, base_layer: nn.Module, shared: ToyBank, seed: int) -> None:
        super().__init__()
        self.n_in, self.n_out = in_out_features(base_layer)
        self.use_shared(shared)
        self.toy_v = _random(self.n_out, seed=seed, scale=0.5, around=1.0)

    def matrix(self) -> torch.Tensor:
        assert self.shared is not None
        bank = self.shared.toy_bank[: self.n_out, : self.n_in]
        return self.toy_v[:, None] * bank.to(self.toy_v)

    def forward(self, x: torch.Tensor, call: grafting.LayerCall) -> torch.Tensor:
        return F.linear(x.to(self.toy_v.dtype), self.matrix())

    def merge(self, base_layer: nn.Module) -> None:
        add_to_weight(base_layer, self.matrix().detach())

    def unmerge(self, base_layer: nn.Module) -> None:
        add_to_weight(base_layer, self.matrix().detach(), alpha=-1.0)


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
            Method(peft_type="TOY_SHARED", name="toy_shared", config_class=ToySharedConfig),
        ]

    def __init__(self) -> None:
        self.shared_calls: list[list[str]] = []  # the targets each grafting_create_shared_state call saw

    @hookimpl
    def grafting_create_shared_state(self, config: Any, targets: dict[str, nn.Module]) -> SharedState | None:
        if not isinstance(config, ToySharedConfig):
            return None
        self.shared_calls.append(list(targets))
        return ToyBank(targets, config.seed, config.save_bank, config.bank_device, config.train_bank)

    @hookimpl
    def grafting_create_layer_adapter(
        self, config: Any, base_layer: nn.Module, adapter_name: str, module_name: str, shared: SharedState | None
    ) -> nn.Module | None:
        if not (isinstance(base_layer, nn.Linear) or is_hf_conv1d(base_layer)):
            return None
        seed = _seed(adapter_name, module_name)
        if isinstance(config, ToySharedConfig):
            assert isinstance(shared, ToyBank)
            return ToySharedDelta(base_layer, shared, seed)
        if isinstance(config, ToyDeltaConfig):
            return ToyDelta(base_layer, config.scale, seed, config.reads_base_weight)
        if isinstance(config, ToyOutputConfig):
            return ToyOutput(base_layer, seed)
        if isinstance(config, ToyInputConfig):
            return ToyInput(base_layer, seed)
        return None
