"""LoRA adapters for linear, embedding and convolution layers (DoRA on linear ones)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from grafting import ConfigError, DeltaAdapter, LayerCall, MergeError
from grafting.toolkit import (
    add_to_weight,
    dense_weight,
    in_out_features,
    plain_linear_weight,
    store_weight,
)
from grafting_lora.fused import DoraLinearFunction, LoraLinearFunction, dora_linear, dora_row_norm, lora_linear
from grafting_lora.hotswap import pad_pair, swap_values
from grafting_lora.init import subtract_initial_delta
from grafting_lora.scaled import embed_scale


def _init_pair(a: torch.Tensor, b: torch.Tensor, init: bool | str, r: int) -> None:
    """A random, B zero (so the adapter starts as the identity), unless ``init`` is False.

    The other string initializations (init.py) set both factors themselves, drawing no numbers here.
    """
    if isinstance(init, str) and init not in ("gaussian", "eva"):  # EVA: A random, B zero until its data step
        return
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(a, std=1 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            nn.init.zeros_(b)


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32 at least: half precision is widened, float64 kept."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


Precision = Literal["input", "adapter"]
PRECISIONS: tuple[str, ...] = ("input", "adapter")
_HALF = (torch.float16, torch.bfloat16)


def compute_dtype(precision: str, own: torch.dtype, x: torch.Tensor) -> torch.dtype:
    """The dtype an adapter's products run in, for input ``x`` and adapter weights of dtype ``own``.

    Under autocast: autocast's. Else, for a half-precision input and wider weights,
    ``"input"`` runs them in the input's dtype (the weights cast down, on tensor
    cores, as autocast would) and ``"adapter"`` in the weights' dtype (the input
    cast up: PEFT's numerics). Weights, gradients and optimizer state keep ``own``.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"LoRA precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if torch.is_autocast_enabled(x.device.type) and torch.float64 not in (own, x.dtype):
        return torch.get_autocast_dtype(x.device.type)
    if precision == "input" and x.dtype in _HALF and own.itemsize > x.dtype.itemsize:
        return x.dtype
    return own


def low_rank_add(
    y: torch.Tensor, h: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``y + (h·aᵀ)·bᵀ (+ bias)`` with the last product accumulated into ``y`` by one ``addmm``.

    ``a`` (r, in) and ``b`` (out, r) already carry the scaling and the compute dtype;
    ``y`` is left untouched (autograd may hold it, and ``LayerCall.base_out`` is it).
    """
    low = F.linear(h, a)
    if bias is not None:
        y = y + bias
    flat = torch.addmm(y.reshape(-1, y.shape[-1]), low.reshape(-1, low.shape[-1]), b.t())
    return flat.view(y.shape)


def _stacked(adapters: Sequence[LoraLinear], dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The adapters' A (n+1, r, in) and scaled B (n+1, out, r) in ``dtype``, zero-padded, slot n all zero.

    Without autograd (inference, outside ``torch.compile``) the stacks are kept on the first
    adapter until a weight changes (its version counter), a scaling, or the group does.
    """
    cache = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
    key = (
        tuple((id(a), a.lora_A.weight._version, a.lora_B.weight._version, a.scaling, a.r) for a in adapters),
        dtype,
        device,
    )
    if cache:
        hit = getattr(adapters[0], "_stacked_cache", None)
        if hit is not None and hit[0] == key:
            return hit[1]
    rank = max(a.r for a in adapters)
    n_in, n_out = adapters[0].lora_A.in_features, adapters[0].lora_B.out_features
    stack_a = torch.zeros(len(adapters) + 1, rank, n_in, dtype=dtype, device=device)
    stack_b = torch.zeros(len(adapters) + 1, n_out, rank, dtype=dtype, device=device)
    for k, adapter in enumerate(adapters):
        stack_a[k, : adapter.r] = adapter.lora_A.weight
        stack_b[k, :, : adapter.r] = adapter.lora_B.weight * adapter.scaling
    if cache:
        adapters[0]._stacked_cache = (key, (stack_a, stack_b))
    return stack_a, stack_b


def grouped_low_rank_add(
    y: torch.Tensor, x: torch.Tensor, index: torch.Tensor, adapters: Sequence[LoraLinear]
) -> torch.Tensor:
    """``y`` plus, for each sample ``i``, the delta of ``adapters[index[i]]`` (none where ``index[i]`` is -1).

    One gathered product for all adapters (as multi-LoRA servers batch them): the A and B
    matrices are stacked (ranks zero-padded to the largest, a zero slot for -1), each sample
    gathers its own pair and two batched products run over the whole batch.
    """
    dtype = y.dtype
    stack_a, stack_b = _stacked(adapters, dtype, y.device)
    slot = torch.where(index < 0, len(adapters), index)
    seq = x.reshape(x.shape[0], -1, x.shape[-1]).to(dtype)  # (batch, positions, in)
    low = torch.bmm(seq, stack_a[slot].transpose(1, 2))
    out = torch.baddbmm(y.reshape(y.shape[0], -1, y.shape[-1]), low, stack_b[slot].transpose(1, 2))
    return out.view(y.shape)


class LoraLinear(DeltaAdapter):
    """``delta = B(A(dropout(x))) · scaling`` for ``nn.Linear`` and ``Conv1D``; DoRA optional.

    With a bf16/fp16 base and float32 adapter weights the products run in the
    base's dtype (:attr:`precision`), with the scaling folded into ``B`` and the
    last product accumulated into the base output by one ``addmm``. In float32
    and float64, and with ``precision = "adapter"``, the delta is formed in
    PEFT's order of operations and added in the wider dtype (PEFT's bits).
    """

    #: ``"input"`` (default): products in the base's half precision, weights cast down as
    #: autocast would; ``"adapter"``: the input cast up to the weights' dtype, as PEFT does.
    precision: Precision = "input"
    #: ``False`` forces the plain composition ``y + B(A(h))·scaling`` (the reference the
    #: fused path is tested against).
    fused: bool = True
    #: Under ``torch.compile`` the plain ops (``add_delta``) are traced and fused by the compiler;
    #: ``True`` keeps the one-node layer of :meth:`fused_call` there too.
    node_when_compiling: bool = False

    lora_convertible = True

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        scaling: float,
        dropout: float = 0.0,
        init: bool | str = True,
        use_dora: bool = False,
        lora_bias: bool = False,
    ) -> None:
        super().__init__()
        n_in, n_out = in_out_features(base_layer)
        self.r, self.scaling, self.use_dora = r, scaling, use_dora
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(n_in, r, bias=False)
        self.lora_B = nn.Linear(r, n_out, bias=lora_bias)
        _init_pair(self.lora_A.weight, self.lora_B.weight, init, r)
        if lora_bias:
            nn.init.zeros_(self.lora_B.bias)
        if use_dora:
            if self.lora_A.weight.is_meta:  # created for loading: the file holds the magnitude
                norm = torch.empty(n_out, device="meta")
            else:
                with torch.no_grad():
                    norm = self._weight_norm(_wide(dense_weight(base_layer)))
            self.lora_magnitude_vector = nn.Parameter(norm)
        self._dora_merge_scale: torch.Tensor | None = None

    #: Set by a PiSSA/OLoRA/CorDA initialization (init.py): ``attach`` leaves ``W − scaling·B·A`` in the base.
    leaves_residual = False
    #: Set by LoftQ (loftq.py): the (out, in) weight ``attach`` stores in the base (W quantized and dequantized).
    new_base_weight: torch.Tensor | None = None
    #: Set by CorDA (corda.py): called with the base layer once ``attach`` has written it.
    after_attach: Callable[[nn.Module], None] | None = None

    def attach(self, base_layer: nn.Module) -> None:
        if self.leaves_residual:
            subtract_initial_delta(base_layer, self.lora_A.weight, self.lora_B.weight, self.scaling)
        if self.new_base_weight is not None:
            store_weight(base_layer, self.new_base_weight)
            self.new_base_weight = None
        if self.after_attach is not None:
            self.after_attach(base_layer)
            self.after_attach = None

    @property
    def reads_base_weight(self) -> bool:  # type: ignore[override]
        """DoRA's merge rescales rows by norms of the weight it merges into (see ARCHITECTURE.md)."""
        return self.use_dora

    def delta_matrix(self) -> torch.Tensor:
        """``B·A·scaling`` as an (out, in) matrix."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def pad_rank(self, rank: int) -> None:
        pad_pair(self, rank)

    def hotswap_values(
        self, tensors: dict[str, torch.Tensor], config: Any, module_name: str
    ) -> dict[str, torch.Tensor]:
        return swap_values(self, tensors, config, module_name)

    def _weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        delta = (self.lora_B.weight.to(weight) @ self.lora_A.weight.to(weight)) * self.scaling  # in weight's dtype
        return torch.linalg.vector_norm(weight + delta, dim=1)

    def forward(self, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        dtype = compute_dtype(self.precision, self.lora_A.weight.dtype, x)
        h = self.lora_dropout(x.to(dtype))
        a, b = self.lora_A.weight.to(dtype), self.lora_B.weight.to(dtype)
        bias = None if self.lora_B.bias is None else self.lora_B.bias.to(dtype)
        out = F.linear(F.linear(h, a), b, bias)
        out = self._dora(h, out, call) if self.use_dora else out * self.scaling
        return out  # in the compute dtype: the layer adds it to the base output and rounds once

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        dtype = compute_dtype(self.precision, self.lora_A.weight.dtype, x)
        if not self.fused or dtype not in _HALF or y.dtype != dtype:
            return y + self(x, call)
        h = self.lora_dropout(x.to(dtype))
        a = self.lora_A.weight.to(dtype)
        b = (self.lora_B.weight * self.scaling).to(dtype)  # the scaling folded into the (out, r) matrix
        if not self.use_dora:
            bias = None if self.lora_B.bias is None else (self.lora_B.bias * self.scaling).to(dtype)
            return low_rank_add(y, h, a, b, bias)
        return self._dora_add(y, h, a, b, call)

    def fused_call(self, base_layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """The base linear layer and this delta as one autograd node (:mod:`grafting_lora.fused`).

        Taken for a plain ``nn.Linear``/``Conv1D`` base (no hooks) in half precision, without
        ``lora_bias``, dropout included (DoRA: without dropout); else ``None`` (the layer
        composes as usual).
        """
        if not self.fused or self.lora_B.bias is not None or x.dtype not in _HALF:
            return None
        drop = self.lora_dropout
        dropout = drop.p if type(drop) is nn.Dropout and drop.training else 0.0
        if dropout >= 1.0 or (dropout and self.use_dora):  # all dropped, or DoRA's W·h: the composition
            return None
        if torch.compiler.is_compiling() and not self.node_when_compiling:
            return None
        weight = plain_linear_weight(base_layer)
        if weight is None:
            return None
        if weight.dtype != x.dtype or compute_dtype(self.precision, self.lora_A.weight.dtype, x) != x.dtype:
            return None
        if self.use_dora:
            return self._dora_call(x, weight, base_layer.bias)
        if not torch.is_grad_enabled() and not dropout:  # inference: the same kernels without a node's overhead
            return lora_linear(x, weight, base_layer.bias, self.lora_A.weight, self.lora_B.weight, self.scaling)
        return LoraLinearFunction.apply(
            x, weight, base_layer.bias, self.lora_A.weight, self.lora_B.weight, self.scaling, dropout
        )

    def _dora_call(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """DoRA's layer as one node (:class:`DoraLinearFunction`), with ``‖W‖²`` kept per weight version."""
        key = (weight.data_ptr(), weight._version, weight.device, weight.shape)
        kept = self.__dict__.get("_weight_sq")
        if kept is None or kept[0] != key:  # the frozen weight's squared row norms, once per version
            with torch.no_grad():
                kept = (key, torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square())
            self.__dict__["_weight_sq"] = kept
        a, b, m = self.lora_A.weight, self.lora_B.weight, self.lora_magnitude_vector
        if not torch.is_grad_enabled():
            norm = dora_row_norm(weight, kept[1], a, b, self.scaling)
            return dora_linear(x, weight, bias, a, b, m / norm, self.scaling)
        return DoraLinearFunction.apply(x, weight, bias, a, b, m, kept[1], self.scaling)

    @classmethod
    def add_grouped(
        cls, adapters: Sequence[DeltaAdapter], y: torch.Tensor, x: torch.Tensor, index: torch.Tensor, call: LayerCall
    ) -> torch.Tensor | None:
        """Plain LoRA adapters routed per sample: one gathered product for all (:func:`grouped_low_rank_add`)."""
        loras = [a for a in adapters if isinstance(a, LoraLinear)]
        if len(loras) != len(adapters) or any(not a.fused or a.use_dora or a.lora_B.bias is not None for a in loras):
            return None
        if any(a.training and not isinstance(a.lora_dropout, nn.Identity) for a in loras):
            return None  # each adapter draws its own dropout mask on its own rows
        if y.dtype not in _HALF or any(compute_dtype(a.precision, a.lora_A.weight.dtype, x) != y.dtype for a in loras):
            return None  # float32/float64 or precision "adapter": PEFT's order of operations, one at a time
        return grouped_low_rank_add(y, x, index, loras)

    def _dora_add(
        self, y: torch.Tensor, h: torch.Tensor, a: torch.Tensor, b: torch.Tensor, call: LayerCall
    ) -> torch.Tensor:
        """DoRA in the compute dtype: ``y + (s-1)·Wh + s·lora = s·(Wh + lora) + bias`` without dropout."""
        base = call.base_layer
        with torch.no_grad():
            norm = self._weight_norm(_wide(dense_weight(base)))
        scale = (self.lora_magnitude_vector / norm).to(h.dtype)
        bias = getattr(base, "bias", None)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            plain = y if bias is None else y - bias.to(y.dtype)  # W·x: the base output without its bias
            out = low_rank_add(plain, h, a, b) * scale
            return out if bias is None else out + bias.to(y.dtype)
        # with dropout the base product is of the dropped input: W·h, as PEFT computes it
        dropped = F.linear(h, dense_weight(base).to(h.dtype))
        return y + low_rank_add(dropped, h, a, b) * scale - dropped

    def _dora(self, h: torch.Tensor, lora_out: torch.Tensor, call: LayerCall) -> torch.Tensor:
        """DoRA's delta; ``lora_out`` is ``B(A(h))`` unscaled, multiplied in PEFT's order (same bits)."""
        base = call.base_layer
        with torch.no_grad():  # DoRA treats the norm as a constant: no graph, nothing saved for backward
            norm = self._weight_norm(_wide(dense_weight(base).to(h.dtype)))
        scale = self.lora_magnitude_vector / norm
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            # the base output in its own dtype: the product promotes, and autograd keeps no wider copy
            base_out = call.base_out
            bias = getattr(base, "bias", None)
            if bias is not None:
                base_out = base_out - bias
        else:
            base_out = F.linear(h, dense_weight(base).to(h.dtype))
        return (scale - 1) * base_out + scale * lora_out * self.scaling  # PEFT's order of operations

    @torch.no_grad()
    def merge(self, base_layer: nn.Module) -> None:
        if self.use_dora:
            weight = _wide(dense_weight(base_layer))
            merged = weight + self.delta_matrix().to(weight)
            scale = self.lora_magnitude_vector.to(weight) / torch.linalg.vector_norm(merged, dim=1)
            self._dora_merge_scale = scale
            store_weight(base_layer, scale[:, None] * merged)
        else:
            add_to_weight(base_layer, self.delta_matrix())
        self._merge_bias(base_layer, 1.0)

    @torch.no_grad()
    def unmerge(self, base_layer: nn.Module) -> None:
        self._merge_bias(base_layer, -1.0)
        if self.use_dora:
            if self._dora_merge_scale is None:
                raise MergeError("DoRA adapter was not merged by this process; cannot unmerge it")
            weight = _wide(dense_weight(base_layer))
            store_weight(base_layer, weight / self._dora_merge_scale[:, None] - self.delta_matrix().to(weight))
            self._dora_merge_scale = None
        else:
            add_to_weight(base_layer, self.delta_matrix(), alpha=-1.0)

    def _merge_bias(self, base_layer: nn.Module, sign: float) -> None:
        if self.lora_B.bias is None:
            return
        if getattr(base_layer, "bias", None) is None:
            raise MergeError("lora_bias=True needs a base layer with a bias to merge into")
        base_layer.bias.add_(self.lora_B.bias.to(base_layer.bias.dtype), alpha=sign * self.scaling)


class LoraEmbedding(DeltaAdapter):
    """``delta = embed(x, Aᵀ) · Bᵀ · scaling`` for ``nn.Embedding`` (saved as lora_embedding_A/B)."""

    lora_convertible = True

    def __init__(self, base_layer: nn.Embedding, r: int, scaling: float, init: bool | str = True) -> None:
        super().__init__()
        embed_scale(base_layer)  # refuse a scale that is not one number before anything is built
        self.r, self.scaling = r, scaling
        self.lora_embedding_A = nn.Parameter(torch.empty(r, base_layer.num_embeddings))
        self.lora_embedding_B = nn.Parameter(torch.empty(base_layer.embedding_dim, r))
        with torch.no_grad():
            if init is False:
                nn.init.normal_(self.lora_embedding_A)
            else:
                nn.init.zeros_(self.lora_embedding_A)
            nn.init.normal_(self.lora_embedding_B)

    def delta_matrix(self) -> torch.Tensor:
        return (self.lora_embedding_B @ self.lora_embedding_A) * self.scaling

    def forward(self, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        base: nn.Embedding = call.base_layer  # type: ignore[assignment]
        after_a = F.embedding(
            x,
            self.lora_embedding_A.T,
            base.padding_idx,
            base.max_norm,
            base.norm_type,
            base.scale_grad_by_freq,
            base.sparse,
        )
        out = (after_a @ self.lora_embedding_B.T) * self.scaling
        scale = embed_scale(base)  # a scaled embedding (Gemma 3) scales its rows: the delta's too
        return out if scale is None else out * scale.to(device=out.device, dtype=out.dtype)

    def merge(self, base_layer: nn.Module) -> None:
        add_to_weight(base_layer, self.delta_matrix())

    def unmerge(self, base_layer: nn.Module) -> None:
        add_to_weight(base_layer, self.delta_matrix(), alpha=-1.0)


class LoraConv(DeltaAdapter):
    """``delta = B(A(dropout(x))) · scaling`` for ``nn.Conv1d/2d/3d``: A a conv, B a 1×1 conv."""

    lora_convertible = True

    def __init__(
        self,
        base_layer: nn.modules.conv._ConvNd,
        r: int,
        scaling: float,
        dropout: float = 0.0,
        init: bool | str = True,
        lora_bias: bool = False,
    ) -> None:
        super().__init__()
        conv = type(base_layer)
        self.r, self.scaling = r, scaling
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = conv(
            base_layer.in_channels,
            r,
            base_layer.kernel_size,
            base_layer.stride,
            base_layer.padding,
            base_layer.dilation,
            bias=False,
        )
        ones = (1,) * len(base_layer.kernel_size)
        self.lora_B = conv(r, base_layer.out_channels, ones, ones, bias=lora_bias)
        _init_pair(self.lora_A.weight, self.lora_B.weight, init, r)
        if lora_bias:
            nn.init.zeros_(self.lora_B.bias)

    def delta_matrix(self) -> torch.Tensor:
        return (self.lora_B.weight.flatten(1) @ self.lora_A.weight.flatten(1)) * self.scaling

    #: as :attr:`LoraLinear.precision`
    precision: Precision = "input"

    def forward(self, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        dtype = compute_dtype(self.precision, self.lora_A.weight.dtype, x)
        h = self.lora_dropout(x.to(dtype))
        b_bias = None if self.lora_B.bias is None else self.lora_B.bias.to(dtype)
        mid = self.lora_A._conv_forward(h, self.lora_A.weight.to(dtype), None)
        return self.lora_B._conv_forward(mid, self.lora_B.weight.to(dtype), b_bias) * self.scaling

    @torch.no_grad()
    def merge(self, base_layer: nn.Module) -> None:
        add_to_weight(base_layer, self.delta_matrix())
        if self.lora_B.bias is not None:
            base_layer.bias.add_(self.lora_B.bias.to(base_layer.bias.dtype), alpha=self.scaling)

    @torch.no_grad()
    def unmerge(self, base_layer: nn.Module) -> None:
        add_to_weight(base_layer, self.delta_matrix(), alpha=-1.0)
        if self.lora_B.bias is not None:
            base_layer.bias.sub_(self.lora_B.bias.to(base_layer.bias.dtype) * self.scaling)
