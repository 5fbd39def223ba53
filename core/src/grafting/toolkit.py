"""The plugin author's toolkit: what every method plugin would otherwise rewrite.

Public, with :mod:`grafting` (configs, errors, the adapter classes, ``hookimpl``),
:mod:`grafting.protocol` (the contract) and :mod:`grafting.testing` (test helpers).

* config fields: :func:`positive`, :func:`positive_int`, :func:`probability`,
  :func:`boolean`, :func:`one_of`, :func:`optional_string`, :func:`names` with the
  :func:`module_names` converter, :func:`pattern_of` (strict: bools are bools, numbers
  finite and bounded, regexes compile; :func:`check_count` for a count checked by hand); per-module ranks and alphas with
  :class:`RankAlphaPatterns`;
* default targets: :func:`model_type`, :func:`default_targets`,
  :func:`query_value_projections`; the modules a config adapts: :func:`find_targets` (for a
  method's data step that runs before ``add_adapter``);
* layers: :func:`is_linear`, :func:`is_conv`, :func:`is_hf_conv1d`,
  :func:`in_out_features`, and the weight access every merge goes through
  (:func:`dense_weight`, :func:`store_weight`, :func:`add_to_weight`,
  :func:`weight_matrix`), which quantized layers support through the codec hooks;
* base parameters a config trains: :func:`trainable_biases`;
* warnings: :func:`warn_fan_in_fan_out`;
* tied weights: :func:`tied_embedding` (the input embedding and the modules sharing its weight);
* adapter arithmetic: :func:`compute_dtype` (the dtype an adapter computes in, for its ``precision``
  option and autocast) and :func:`convolve_as` (a convolution with a base layer's stride, padding,
  dilation, groups and padding mode);
* hot-swapping (a layer adapter's ``pad_rank``/``hotswap_values``): :func:`grow_tensor` (zeros up to a
  target rank), :func:`fit_state` and :func:`fit` (a saved adapter's tensors in the loaded one's shapes,
  rank dimensions zero-padded), :func:`require_same` (refuse a differing option); for
  ``hotswap_blank_values``, :func:`zeros_state` (zeros for every tensor of the adapter);
* merging: :class:`WeightDeltaAdapter`, a ``DeltaAdapter`` whose effect is a weight delta (it merges
  and unmerges by adding and subtracting its ``delta_matrix()``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from grafting.config.validators import (
    boolean,
    check_count,
    iteration_count,
    iterations,
    module_names,
    names,
    one_of,
    optional_string,
    pattern_of,
    positive,
    positive_int,
    probability,
)
from grafting.errors import ConfigError, GraftingWarning
from grafting.model.combine import union_of_targets
from grafting.model.matching import candidate_modules, find_targets, name_matches, pattern_value
from grafting.model.model_types import QUERY_VALUE_PROJECTIONS, model_type, query_value_projections
from grafting.model.swap import fit, fit_state, grow_tensor, require_same, zeros_state
from grafting.model.tying import TiedEmbedding, tied_embedding
from grafting.model.weights import (
    add_to_weight,
    dense_weight,
    in_out_features,
    is_hf_conv1d,
    plain_linear_weight,
    store_weight,
    weight_matrix,
)
from grafting.protocol import DeltaAdapter


# -- merging -------------------------------------------------------------------------------------------
class WeightDeltaAdapter(DeltaAdapter):
    """A :class:`~grafting.DeltaAdapter` whose effect is ``x·ΔWᵀ`` with ``ΔW = delta_matrix()``.

    It merges by adding ``ΔW`` to the base layer's weight and unmerges by subtracting it
    (:func:`add_to_weight`: in float32, rounded once, quantized weights through their codec).
    A subclass implements :meth:`delta_matrix` and the forward.
    """

    @torch.no_grad()
    def merge(self, base_layer: nn.Module) -> None:
        add_to_weight(base_layer, self.delta_matrix())

    @torch.no_grad()
    def unmerge(self, base_layer: nn.Module) -> None:
        add_to_weight(base_layer, self.delta_matrix(), alpha=-1.0)


# -- per-module options ------------------------------------------------------------------------------
class RankAlphaPatterns:
    """Config mixin: a module's rank and alpha, ``rank_pattern``/``alpha_pattern`` overriding the defaults.

    The config declares the two dict fields, validated with :func:`pattern_of`
    (``rank_pattern: dict[str, int] = attrs.field(factory=dict, validator=pattern_of(positive_int))``,
    ``alpha_pattern`` with ``pattern_of(positive)``); a key is a regex matched as a
    dotted suffix of the module name, the first matching key wins (PEFT's rule).
    ``rank_option``/``alpha_option`` name the fields holding the defaults.
    """

    __slots__ = ()
    #: The core warns about keys of these fields that match no adapted module (AdapterConfig.pattern_fields).
    pattern_fields: ClassVar[tuple[str, ...]] = ("rank_pattern", "alpha_pattern")
    rank_option: ClassVar[str] = "r"
    alpha_option: ClassVar[str] = "alpha"

    def rank_for(self, module_name: str) -> int:
        return pattern_value(getattr(self, "rank_pattern"), module_name, getattr(self, self.rank_option))  # noqa: B009

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(getattr(self, "alpha_pattern"), module_name, getattr(self, self.alpha_option))  # noqa: B009

    def scaling_for(self, module_name: str, *, rank_stabilized: bool = False) -> float:
        """``alpha / r`` (``alpha / √r`` when ``rank_stabilized``) for the module."""
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if rank_stabilized else alpha / r


# -- default targets ---------------------------------------------------------------------------------
def default_targets(table: Mapping[str, Sequence[str]], model: Any) -> list[str] | None:
    """``table[model_type(model)]`` as a list, or ``None`` for a model type the table lacks."""
    found = table.get(model_type(model))
    return list(found) if found is not None else None


# -- base parameters -------------------------------------------------------------------------------
#: Parameters inside grafting's wrappers that are not the base model's: adapters, and both sides of a
#: modules_to_save wrapper (its copies train in full; the original stays frozen, as in PEFT).
_WRAPPER_PARTS = ("adapters", "modules_to_save", "original_module", "shared_states", "model_adapters")


def trainable_biases(model: nn.Module, adapted_paths: list[str], bias: str) -> list[str]:
    """The base-model biases a PEFT-style ``bias`` option trains (for ``AdapterConfig.trainable_base_parameters``).

    ``"none"``: none; ``"all"``: every bias of the base model; any other value
    (``"lora_only"``, ``"vera_only"``): the biases of the adapted layers.
    """
    if bias == "none":
        return []
    if bias != "all":
        return [
            f"{path}.base_layer.bias"
            for path in adapted_paths
            if getattr(model.get_submodule(path).base_layer, "bias", None) is not None
        ]
    return [
        name
        for name, _ in model.named_parameters()
        if name.endswith("bias") and not any(f".{part}." in name for part in _WRAPPER_PARTS)
    ]


# -- layers --------------------------------------------------------------------------------------------
def is_linear(layer: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D`` (GPT-2's linear layer, weight stored (in, out))."""
    return isinstance(layer, nn.Linear) or is_hf_conv1d(layer)


def is_conv(layer: nn.Module) -> bool:
    """``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d``."""
    return isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d))


def warn_fan_in_fan_out(config: Any, layer: nn.Module) -> None:
    """Warn when ``config.fan_in_fan_out`` does not fit a linear ``layer``'s own weight layout.

    grafting always reads each layer's own layout, so the option only matters
    to PEFT. The message names the config class, the value and the layer type,
    never the layer, so Python's warning filter shows it once, not once per layer.
    """
    value = bool(getattr(config, "fan_in_fan_out", False))
    if not is_linear(layer) or value == is_hf_conv1d(layer):
        return
    warnings.warn(
        f"{type(config).__name__}.fan_in_fan_out={value} does not fit the {type(layer).__name__} layers it"
        " targets; grafting uses each layer's own weight layout",
        GraftingWarning,
        stacklevel=2,
    )


# -- adapter arithmetic ------------------------------------------------------------------------------
#: An adapter's ``precision`` option: which dtype its products run in for a half-precision input.
Precision = Literal["input", "adapter"]
PRECISIONS: tuple[str, ...] = ("input", "adapter")
HALF_PRECISION: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)


def compute_dtype(
    precision: str, adapter_dtype: torch.dtype, x: torch.Tensor, *, autocast: bool = True, where: str = "adapter"
) -> torch.dtype:
    """The dtype an adapter's arithmetic runs in, for input ``x`` and adapter weights of ``adapter_dtype``.

    The one policy of grafting's methods, in order:

    1. under autocast for ``x``'s device (when ``autocast``, and neither dtype is float64): autocast's
       dtype, as for the base layer's own product (pass ``autocast=False`` for an elementwise product,
       which autocast leaves alone);
    2. ``precision="input"``, a half-precision ``x`` and wider weights: ``x``'s dtype (the weights cast
       down, on tensor cores, as autocast would cast them);
    3. otherwise ``adapter_dtype`` (``"adapter"``: the input cast up to the weights, PEFT's numerics).

    Weights, their gradients and optimizer state keep ``adapter_dtype`` either way; the adapter casts
    its result to the base output's dtype. ``precision`` outside :data:`PRECISIONS` raises
    :class:`~grafting.ConfigError` naming ``where``.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"{where}: precision must be one of {list(PRECISIONS)}, got {precision!r}")
    device = x.device.type
    if autocast and torch.is_autocast_enabled(device) and torch.float64 not in (adapter_dtype, x.dtype):
        return torch.get_autocast_dtype(device)
    if precision == "input" and x.dtype in HALF_PRECISION and adapter_dtype.itemsize > x.dtype.itemsize:
        return x.dtype
    return adapter_dtype


_CONVOLUTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _explicit_padding(layer: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> list[int]:
    """``layer``'s padding as ``F.pad``'s list (last dimension first, before and after each)."""
    pairs: list[int] = []
    for k, d, p in reversed(list(zip(layer.kernel_size, layer.dilation, _padding_tuple(layer), strict=True))):
        if p == "same":
            total = d * (k - 1)
            pairs += [total // 2, total - total // 2]
        else:
            pairs += [int(p), int(p)]
    return pairs


def _padding_tuple(layer: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> tuple[int | str, ...]:
    padding = layer.padding
    if isinstance(padding, str):
        return (padding if padding == "same" else 0,) * len(layer.kernel_size)
    return tuple(padding)


def convolve_as(
    layer: nn.Conv1d | nn.Conv2d | nn.Conv3d,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x`` convolved with ``weight`` (and ``bias``) the way ``layer`` convolves with its own weight.

    ``layer``'s stride, padding (numbers, ``"same"`` or ``"valid"``), dilation, groups and
    padding mode (``"zeros"``, ``"reflect"``, ``"replicate"``, ``"circular"``) apply; ``weight``
    has the shape ``layer.weight`` would have for its output channels: (out, in / groups, *kernel).
    For an adapter's delta through the base layer's geometry, without torch's private ``_conv_forward``.
    """
    conv = _CONVOLUTIONS[weight.dim() - 2]
    if layer.padding_mode == "zeros":
        return conv(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    padded = F.pad(x, _explicit_padding(layer), mode=layer.padding_mode)
    return conv(padded, weight, bias, layer.stride, 0, layer.dilation, layer.groups)


__all__ = [
    "HALF_PRECISION",
    "PRECISIONS",
    "QUERY_VALUE_PROJECTIONS",
    "Precision",
    "RankAlphaPatterns",
    "TiedEmbedding",
    "WeightDeltaAdapter",
    "add_to_weight",
    "boolean",
    "candidate_modules",
    "check_count",
    "compute_dtype",
    "convolve_as",
    "default_targets",
    "dense_weight",
    "find_targets",
    "fit",
    "fit_state",
    "grow_tensor",
    "in_out_features",
    "is_conv",
    "is_hf_conv1d",
    "is_linear",
    "iteration_count",
    "iterations",
    "model_type",
    "module_names",
    "name_matches",
    "names",
    "one_of",
    "optional_string",
    "pattern_of",
    "pattern_value",
    "plain_linear_weight",
    "positive",
    "positive_int",
    "probability",
    "query_value_projections",
    "require_same",
    "store_weight",
    "tied_embedding",
    "trainable_biases",
    "union_of_targets",
    "warn_fan_in_fan_out",
    "weight_matrix",
    "zeros_state",
]
