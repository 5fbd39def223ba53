"""LoRA on parameters rather than modules: ``target_parameters`` and ``nn.MultiheadAttention``.

Both are :class:`grafting.WeightAdapter` s: the layer runs with ``W + ΔW`` in place of the
adapted parameters. On disk they are named as PEFT names them: the last adapted parameter of a
module holds ``lora_A``/``lora_B`` at the module's path, each earlier one sits one
``base_layer.`` deeper (PEFT wraps the module once per parameter); the attention's output
projection is ``base_layer.out_proj.lora_A``/``lora_B``.

A 3-D parameter holds one matrix per expert, ``(experts, out, in)`` (``(experts, in, out)``
when the module says ``is_transposed``): ``lora_A`` is ``(experts·r, in)`` with expert ``e`` in
rows ``e·r .. e·r+r-1``, ``lora_B`` is ``(out, r·experts)`` with expert ``e`` in columns
``e, e+experts, ...``, so ``ΔW_e = B_e A_e · scaling``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from grafting import AdaptedLayer, ConfigError, UnsupportedLayerError, WeightAdapter
from grafting.toolkit import candidate_modules
from grafting_lora.init import init_factors
from grafting_lora.low_rank_weight import LowRankWeight, Term
from grafting_lora.reference import delta_weight


class LoraFactors(nn.Module):
    """``lora_A``/``lora_B`` for one parameter; ``base_layer`` holds the factors of the one wrapped before it."""

    def __init__(self, shape: Sequence[int], r: int, scaling: float, init: bool | str, transposed: bool) -> None:
        super().__init__()
        if len(shape) == 3:
            experts, first, second = shape
            n_in, n_out = (first, second) if transposed else (second, first)
        elif len(shape) == 2:
            experts, (n_out, n_in) = 1, shape
        else:
            raise UnsupportedLayerError(f"LoRA adapts 2-D or 3-D parameters, not one of shape {tuple(shape)}")
        self.experts, self.r, self.scaling, self.transposed = experts, r, scaling, transposed
        self.lora_A = nn.Linear(n_in, r * experts, bias=False)
        self.lora_B = nn.Linear(r * experts, n_out, bias=False)
        init_factors(self.lora_A.weight, self.lora_B.weight, init, r)

    def term(self) -> Term:
        """``ΔW`` as a low-rank term ``s·L·R`` in the parameter's layout (:mod:`grafting_lora.low_rank_weight`)."""
        a, b = self.lora_A.weight, self.lora_B.weight
        a = a.reshape(self.experts, self.r, a.shape[-1])  # (experts, r, in)
        b = b.reshape(b.shape[0], self.r, self.experts).permute(2, 0, 1)  # (experts, out, r)
        if self.experts == 1:
            a, b = a[0], b[0]
        return Term(a.mT, b.mT, self.scaling) if self.transposed else Term(b, a, self.scaling)

    def delta(self) -> torch.Tensor:
        """ΔW in the parameter's shape."""
        a, b = self.lora_A.weight, self.lora_B.weight
        if self.experts == 1 and not self.transposed:
            return delta_weight(a, b, self.scaling)
        a = a.reshape(self.experts, self.r, a.shape[-1])  # (experts, r, in)
        b = b.reshape(b.shape[0], self.r, self.experts).permute(2, 0, 1)  # (experts, out, r)
        delta = torch.bmm(b, a) * self.scaling  # (experts, out, in)
        return delta.transpose(1, 2) if self.transposed else delta


def _nest(levels: list[LoraFactors]) -> None:
    """Each level holds the one before it as ``base_layer`` (PEFT's nesting of one wrapper per parameter)."""
    for outer, inner in zip(levels[1:], levels[:-1]):
        outer.base_layer = inner


class LoraParameters(WeightAdapter):
    """LoRA on the named parameters of one module (``target_parameters``), in the module's parameter order.

    A 3-D (expert) tensor reaches the layer as a :class:`~grafting_lora.low_rank_weight.LowRankWeight`:
    each routed token meets only its expert's factors and ``ΔW`` is never formed (:meth:`call_weights`).
    """

    #: ``False`` (on the class or one adapter): the reference, ``W + ΔW`` formed for every call.
    fused: bool = True
    #: as :attr:`grafting_lora.layers.LoraLinear.precision`; ``"adapter"`` forms ``W + ΔW`` (PEFT's numerics).
    precision: str = "input"

    def __init__(self, base_layer: nn.Module, names: Sequence[str], r: int, scaling: float, init: bool | str) -> None:
        super().__init__()
        transposed = bool(getattr(base_layer, "is_transposed", False))
        self.names = list(names)
        levels = [LoraFactors(base_layer.get_parameter(n).shape, r, scaling, init, transposed) for n in self.names]
        _nest(levels)
        self.lora_A, self.lora_B = levels[-1].lora_A, levels[-1].lora_B  # the outermost level is this module
        self._levels = tuple(levels)  # a tuple: registered once, through the nesting above
        if len(levels) > 1:
            self.base_layer = levels[-2]

    def weight_deltas(self, base_layer: nn.Module) -> dict[str, torch.Tensor]:
        return {name: level.delta() for name, level in zip(self.names, self._levels)}

    def call_weights(self, base_layer: nn.Module, current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """3-D (expert) tensors as :class:`~grafting_lora.low_rank_weight.LowRankWeight`: the layer's products
        with them take the low-rank form, so no expert's ``ΔW`` is formed; other parameters as ``W + ΔW``."""
        if not self.fused or self.precision == "adapter" or torch.compiler.is_compiling():
            return super().call_weights(base_layer, current)
        out: dict[str, torch.Tensor] = {}
        for name, level in zip(self.names, self._levels):
            weight = current[name] if name in current else base_layer.get_parameter(name)
            if weight.ndim == 3 and weight.is_floating_point():
                out[name] = LowRankWeight.of(weight, [level.term()], self.precision)
            else:
                out[name] = weight + level.delta().to(weight.dtype)
        return out


class LoraMultiheadAttention(WeightAdapter):
    """LoRA on ``nn.MultiheadAttention``: ``in_proj_weight`` and ``out_proj.weight``, with one rank and scaling.

    PEFT 0.21 adds the output projection's ``ΔW`` twice, in its forward and its merges alike
    (its wrapper merges a detached copy, then merges the inner ``out_proj`` adapter too), with the
    gradient of one. Adapters trained there learned under ``W_out + ΔW_out + stopgrad(ΔW_out)``,
    so grafting computes exactly that: a saved adapter gives the same outputs and gradients in both.
    """

    def __init__(self, base_layer: nn.MultiheadAttention, r: int, scaling: float, init: bool | str) -> None:
        super().__init__()
        if not base_layer._qkv_same_embed_dim:
            raise UnsupportedLayerError(
                "LoRA on nn.MultiheadAttention needs query, key and value of the embedding size (one in_proj_weight)"
            )
        self.inner = LoraFactors(base_layer.in_proj_weight.shape, r, scaling, init, False)
        self.outer = LoraFactors(base_layer.out_proj.weight.shape, r, scaling, init, False)
        # PEFT's names: lora_A/lora_B for in_proj, base_layer.out_proj.lora_A/B for the output projection
        self.lora_A, self.lora_B = self.inner.lora_A, self.inner.lora_B
        self.base_layer = nn.Module()
        self.base_layer.out_proj = self.outer
        del self.inner, self.outer

    def weight_deltas(self, base_layer: nn.Module) -> dict[str, torch.Tensor]:
        out_proj = self.base_layer.out_proj
        in_delta = (self.lora_B.weight @ self.lora_A.weight) * out_proj.scaling
        out_delta = out_proj.delta()
        return {"in_proj_weight": in_delta, "out_proj.weight": out_delta + out_delta.detach()}


def check_parameter_options(config: object, where: str) -> None:
    """The LoRA options PEFT refuses on parameter-level adapters, refused here too (ConfigError)."""
    refused = {
        "use_dora": getattr(config, "use_dora", False),
        "lora_bias": getattr(config, "lora_bias", False),
        "lora_dropout": getattr(config, "lora_dropout", 0.0) > 0,
    }
    init = getattr(config, "init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        refused["init_lora_weights"] = True
    bad = [name for name, on in refused.items() if on]
    if bad:
        raise ConfigError(f"{where}: LoRA on parameters does not support {', '.join(bad)} (PEFT refuses it too)")


def parameter_plan(spec: Sequence[str], model: nn.Module) -> dict[str, list[str]]:
    """Module path -> names of its own parameters that ``target_parameters`` matches (exactly or as a dotted
    suffix of ``<module>.<parameter>``), in the module's parameter order; raises if an entry matches nothing."""
    plan: dict[str, list[str]] = {}
    used: set[str] = set()
    for path, module in candidate_modules(model):
        module = module.base_layer if isinstance(module, AdaptedLayer) else module
        for name, _ in module.named_parameters(recurse=False):
            full = f"{path}.{name}"
            hits = [key for key in spec if full == key or full.endswith("." + key)]
            if hits:
                plan.setdefault(path, []).append(name)
                used.update(hits)
    missing = [key for key in spec if key not in used]
    if missing:
        raise ConfigError(f"LoraConfig.target_parameters: {missing} match no parameter of the model")
    return plan
