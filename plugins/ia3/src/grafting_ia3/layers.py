"""IA3 adapters: a vector ``ia3_l`` that scales a layer's output (OUTPUT site) or input (INPUT site).

``ia3_l`` has PEFT's shape, so the saved keys and tensors are PEFT's: on
``nn.Linear`` and ``Conv1D`` ``(out, 1)`` for output scaling and ``(1, in)``
for input scaling; on ``nn.Conv2d``/``nn.Conv3d`` ``(1, channels, 1, ...)``.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from grafting import GraftingWarning, InputAdapter, LayerAdapter, MergeError, OutputAdapter
from grafting.toolkit import (
    HALF_PRECISION,
    Precision,
    compute_dtype,
    dense_weight,
    fit_state,
    in_out_features,
    is_linear,
    plain_linear_weight,
    require_same,
    store_weight,
)
from grafting_ia3.config import is_feedforward
from grafting_ia3.fused import IA3InputLinear, IA3OutputLinear, ia3_linear

SUPPORTED_CONVS = (nn.Conv2d, nn.Conv3d)


def supports(layer: nn.Module) -> bool:
    """The base layers IA3 adapts: ``nn.Linear``, transformers' ``Conv1D``, ``nn.Conv2d``, ``nn.Conv3d``."""
    return is_linear(layer) or isinstance(layer, SUPPORTED_CONVS)


def unmerge_tolerance(dtype: torch.dtype) -> float:
    """Entries of ``l`` closer to zero than this are not divided out of a ``dtype`` weight.

    Below it ``W ⊙ l`` leaves the normal range of ``dtype`` (or is zero), so
    ``W`` cannot be recovered from the merged weight.
    """
    return max(1e-6, torch.finfo(dtype).tiny ** 0.5)


class IA3Adapter(LayerAdapter):
    """The vector ``ia3_l`` and how it scales activations and weights; subclasses fix the side.

    On a bf16/fp16 activation a float32 vector is cast down and the product runs in the
    activation's dtype (:attr:`precision` ``"input"``, as autocast would); ``"adapter"``
    multiplies in float32 and rounds once, PEFT's numerics. Alone on a plain linear layer
    in half precision, the vector is folded into the weight (:mod:`grafting_ia3.fused`).
    """

    scales_input: ClassVar[bool]
    peft_attributes = ("ia3_l",)  # PEFT's IA3Layer: layer.ia3_l["default"]
    #: ``"input"`` (default): a half-precision activation is scaled in its own dtype;
    #: ``"adapter"``: in the vector's (float32), as PEFT does.
    precision: Precision = "input"
    #: ``False`` forces the plain composition (the reference the fused layer is tested against).
    fused: bool = True

    def __init__(self, base_layer: nn.Module, init: bool = True, where: str = "IA3 adapter") -> None:
        super().__init__()
        n_in, n_out = in_out_features(base_layer)
        features = n_in if self.scales_input else n_out
        self.where = where
        self.spatial = len(base_layer.kernel_size) if isinstance(base_layer, SUPPORTED_CONVS) else 0
        self.groups = getattr(base_layer, "groups", 1) if self.spatial else 1
        if self.spatial:
            shape: tuple[int, ...] = (1, features) + (1,) * self.spatial
        else:
            shape = (1, features) if self.scales_input else (features, 1)
        # standard-normal entries, kept unless ``init``: PEFT's draws from torch's generator (a seeded script repeats)
        self.ia3_l = nn.Parameter(torch.randn(shape))
        if init:
            self.reset(init)

    @torch.no_grad()
    def reset(self, init: bool = True) -> None:
        """Ones (the adapter starts as the identity), or standard-normal entries if ``init`` is False."""
        if init:
            nn.init.ones_(self.ia3_l)
        else:
            nn.init.normal_(self.ia3_l)

    def vector(self) -> torch.Tensor:
        return self.ia3_l.reshape(-1)

    # -- hot-swapping: IA3 has no rank; the vector is copied, the side (input or output) must be the same --
    def pad_rank(self, rank: int) -> None:
        """Nothing to grow: the vector's length is the layer's."""

    def hotswap_values(self, tensors: dict[str, torch.Tensor], config: Any, module_name: str) -> dict[str, Any]:
        if config.feedforward_modules is not None:
            side = "input (feed-forward)" if is_feedforward(module_name, config.feedforward_modules) else "output"
            require_same("scaled side", side, "input (feed-forward)" if self.scales_input else "output")
        return fit_state(self, tensors, fixed="IA3's vector spans the layer's features")

    def hotswap_blank_values(self, base_layer: nn.Module) -> dict[str, torch.Tensor]:
        """Ones: the layer scaled by one is its base layer."""
        return {"ia3_l": torch.ones_like(self.ia3_l.detach())}

    # -- forward --------------------------------------------------------------------------
    def _compute_dtype(self, t: torch.Tensor) -> torch.dtype:
        """The dtype the product runs in: the toolkit's policy (:func:`grafting.toolkit.compute_dtype`).

        An elementwise product, which autocast leaves in the activation's dtype: autocast is not followed.
        """
        return compute_dtype(self.precision, self.ia3_l.dtype, t, autocast=False, where=f"{self.where} (IA3)")

    def _scale(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` scaled along its feature (linear) or channel (conv) dimension, in ``t``'s dtype."""
        scale = self.vector().reshape((-1,) + (1,) * self.spatial).to(self._compute_dtype(t))
        return (t * scale).to(t.dtype)

    def fused_call(self, base_layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """The linear layer with ``l`` folded into its weight, one autograd node (:mod:`grafting_ia3.fused`).

        Taken for a plain ``nn.Linear``/``Conv1D`` base (no hooks, frozen weight) whose input
        and weight share a half-precision dtype, with precision ``"input"``, outside autocast
        and ``torch.compile`` (the compiler fuses the plain ops itself); else ``None``.
        """
        if not self.fused or self.spatial or x.dtype not in HALF_PRECISION or self._compute_dtype(x) != x.dtype:
            return None
        if torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type):
            return None
        weight = plain_linear_weight(base_layer)
        if weight is None:
            return None
        if weight.dtype != x.dtype or weight.requires_grad:
            return None
        bias = base_layer.bias
        if not torch.is_grad_enabled():
            return ia3_linear(x, weight, bias, self.vector(), self.scales_input)
        node = IA3InputLinear if self.scales_input else IA3OutputLinear
        return node.apply(x, weight, bias, self.vector())

    # -- merging --------------------------------------------------------------------------
    def _matrix_scale(self, rows: int, columns: int) -> torch.Tensor:
        """``l`` shaped to multiply the (out, in·k) weight matrix: its rows (output) or columns (input)."""
        vec = self.vector()
        if not self.scales_input:
            return vec.reshape(-1, 1)
        if not self.spatial:
            return vec.reshape(1, -1)
        # conv: column j·k + t of output channel o reads input channel group(o)·(in/groups) + j
        per_group = vec.numel() // self.groups
        grouped = vec.reshape(self.groups, 1, per_group).expand(self.groups, rows // self.groups, per_group)
        return grouped.reshape(rows, per_group).repeat_interleave(columns // per_group, dim=1)

    @torch.no_grad()
    def _rescale(self, base_layer: nn.Module, divide: bool) -> None:
        """Multiply (or divide) the weight, and for output scaling the bias, by ``l``; all or nothing."""
        dense = dense_weight(base_layer)
        tol = unmerge_tolerance(dense.dtype)
        magnitude = self.vector().detach().abs()
        near_zero = int((magnitude <= tol).sum())
        detail = f"{near_zero} entries of ia3_l are within {tol:g} of zero (smallest |l| = {float(magnitude.min()):g})"
        if near_zero and divide:
            raise MergeError(
                f"{self.where}: cannot unmerge: {detail}, so the weights they scaled cannot be recovered; "
                "the weights are unchanged (reload the base model to get the original weights back)"
            )
        if near_zero:
            warnings.warn(f"{self.where}: {detail}; merged, it cannot be unmerged", GraftingWarning, stacklevel=3)
        compute = torch.promote_types(dense.dtype, torch.float32)
        scale = self._matrix_scale(*dense.shape).to(device=dense.device, dtype=compute)
        new_weight = dense.to(compute) / scale if divide else dense.to(compute) * scale
        bias = getattr(base_layer, "bias", None) if not self.scales_input else None  # input scaling: no bias
        new_bias = None
        if isinstance(bias, torch.Tensor):
            vec = self.vector().to(device=bias.device, dtype=compute)
            new_bias = bias.to(compute) / vec if divide else bias.to(compute) * vec
        if divide and not all(torch.isfinite(v).all() for v in (new_weight, new_bias) if v is not None):
            raise MergeError(f"{self.where}: unmerging gives non-finite weights; the weights are unchanged")
        store_weight(base_layer, new_weight)
        if isinstance(bias, torch.Tensor) and new_bias is not None:
            bias.copy_(new_bias.to(bias.dtype))

    def merge(self, base_layer: nn.Module) -> None:
        self._rescale(base_layer, divide=False)

    def unmerge(self, base_layer: nn.Module) -> None:
        self._rescale(base_layer, divide=True)


class IA3Output(IA3Adapter, OutputAdapter):
    """``y -> l ⊙ y``: scales the layer's output, bias included."""

    scales_input = False

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self._scale(y)


class IA3Input(IA3Adapter, InputAdapter):
    """``x -> l ⊙ x``: the base layer sees its input scaled per input feature (channel)."""

    scales_input = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._scale(x)
