"""LoRA adapters for linear, embedding and convolution layers (DoRA on linear ones).

Each adapter's ``forward`` is the reference of :mod:`grafting_lora.reference`; ``LoraLinear``'s
``add_delta``, ``add_grouped`` and ``fused_call`` are the fast paths named there.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from grafting import ConfigError, DeltaAdapter, LayerCall, MergeError
from grafting.toolkit import (
    HALF_PRECISION,
    Precision,
    WeightDeltaAdapter,
    add_to_weight,
    compute_dtype,
    convolve_as,
    dense_weight,
    in_out_features,
    plain_linear_weight,
)
from grafting_lora import dropout_kernels
from grafting_lora.dora_kernels import row_scales
from grafting_lora.dora_node import DoraLinearFunction, dora_linear
from grafting_lora.factor_casts import factor_casts, optimizer_steps, weight_state
from grafting_lora.fused import LoraLinearFunction, lora_linear
from grafting_lora.hotswap import PairHotSwap
from grafting_lora.init import Initialization, init_factors
from grafting_lora.magnitude import DoraMagnitude, wide
from grafting_lora.ops import lora_linear_node
from grafting_lora.reference import (
    delta_weight,
    dora_delta,
    grouped_low_rank_add,
    low_rank,
    low_rank_add,
)
from grafting_lora.routed import (
    MAX_COLUMNS,
    column_mask,
    routed_lora_add,
    routed_lora_linear_call,
    side_by_side,
)
from grafting_lora.scaled import embed_scale

#: :attr:`LoraLinear.compiled_form`: plain ops, the autograd Function, or the custom op.
CompiledForm = Literal["ops", "node", "op"]


def _param(module: nn.Module, name: str) -> Any:
    """``module.<name>`` for a parameter (or ``None`` registered in its place), in one dict lookup where it can.

    A ``DataParallel`` replica holds its parameters as plain attributes: those are read as usual.
    """
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


def _kept(adapters: Sequence[LoraLinear], kind: str, dtype: torch.dtype, device: torch.device, build: Any) -> Any:
    """``build()``, kept on the first adapter without autograd (inference, outside ``torch.compile``).

    Kept until a weight changes (:func:`~grafting_lora.factor_casts.weight_state`: a new tensor in its place,
    its version counter, or an optimizer step: fused optimizers write without bumping it), a scaling or rank
    does, or the group does.
    """
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return build()
    key = (
        tuple((id(a), weight_state(a.lora_A.weight), weight_state(a.lora_B.weight), a.scaling, a.r) for a in adapters),
        optimizer_steps(),
        dtype,
        device,
    )
    attribute = f"_{kind}_cache"
    hit = getattr(adapters[0], attribute, None)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = build()
    setattr(adapters[0], attribute, (key, value))
    return value


def _stacked(adapters: Sequence[LoraLinear], dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The adapters' A (n+1, r, in) and scaled B (n+1, out, r) in ``dtype``, zero-padded, slot n all zero."""

    def build() -> tuple[torch.Tensor, ...]:
        rank = max(a.r for a in adapters)
        n_in, n_out = adapters[0].lora_A.in_features, adapters[0].lora_B.out_features
        stack_a = torch.zeros(len(adapters) + 1, rank, n_in, dtype=dtype, device=device)
        stack_b = torch.zeros(len(adapters) + 1, n_out, rank, dtype=dtype, device=device)
        for k, adapter in enumerate(adapters):
            stack_a[k, : adapter.r] = adapter.lora_A.weight
            stack_b[k, :, : adapter.r] = adapter.lora_B.weight * adapter.scaling
        return stack_a, stack_b

    return _kept(adapters, "stacked", dtype, device, build)


def _routable(adapters: Sequence[DeltaAdapter], x: torch.Tensor, dtype: torch.dtype) -> list[LoraLinear] | None:
    """The adapters, when every one is a plain LoRA adapter the routed fast paths compute in ``dtype``; else ``None``."""
    loras = [a for a in adapters if isinstance(a, LoraLinear)]
    if len(loras) != len(adapters) or any(not a.fused or a.use_dora or a.lora_B.bias is not None for a in loras):
        return None
    if any(a.training and not isinstance(a.lora_dropout, nn.Identity) for a in loras):
        return None  # each adapter draws its own dropout mask on its own rows
    if dtype not in HALF_PRECISION or any(a._dtype(x) != dtype for a in loras):
        return None  # float32/float64 or precision "adapter": PEFT's order of operations, one at a time
    return loras


def _side_by_side(
    adapters: Sequence[LoraLinear], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Without autograd, the factors side by side (:func:`~grafting_lora.routed.side_by_side`), kept until a
    weight changes; with autograd ``None`` (the node concatenates them)."""
    if torch.is_grad_enabled():
        return None
    lora_a, lora_b = [a.lora_A.weight for a in adapters], [a.lora_B.weight for a in adapters]
    return _kept(adapters, "side_by_side", dtype, device, lambda: side_by_side(lora_a, lora_b, dtype))


class LoraLinear(PairHotSwap, DoraMagnitude, DeltaAdapter):
    """``delta = B(A(dropout(x))) · scaling`` for ``nn.Linear`` and ``Conv1D``; DoRA optional.

    :meth:`forward` is the reference (:mod:`grafting_lora.reference`, PEFT's order of
    operations). With a bf16/fp16 base and float32 adapter weights the products run in the
    base's dtype (:attr:`precision`) through the fast paths: the scaling folded into ``B`` and
    the last product added to the base output (:meth:`add_delta`),
    one gathered product for routed batches (:meth:`add_grouped`), or the base layer and the
    delta as one autograd node (:meth:`fused_call`). In float32 and float64, and with
    ``precision = "adapter"``, the reference runs (PEFT's bits).
    """

    #: ``"input"`` (default): products in the base's half precision, weights cast down as
    #: autocast would; ``"adapter"``: the input cast up to the weights' dtype, as PEFT does.
    precision: Precision = "input"
    #: ``False`` (on the class or one adapter) turns every fast path off: the layer computes the
    #: reference ``y + forward(x)`` only (what tests and benchmarks compare the fast paths with).
    fused: bool = True
    #: The layer's form under ``torch.compile``: ``"ops"`` (default), the plain ops of :meth:`add_delta`
    #: traced and fused by the compiler; ``"node"``, the autograd Function of :meth:`fused_call` traced
    #: into the graph; ``"op"``, LoRA's layer as the opaque custom op ``grafting_lora::lora_linear``
    #: (:mod:`grafting_lora.ops`; DoRA composes as with ``"ops"``). ``"ops"`` leaves Inductor the least
    #: beyond the frozen layer: per layer the two skinny products forward, four backward, the low-rank
    #: output and input gradient added inside the neighbouring kernels, and two small cast kernels each
    #: way (A and ``scaling·B`` down; their gradients up). The traced node's in-place ``addmm_`` become
    #: out-of-place ``addmm`` (a copy of the (tokens, out) or (tokens, in) operand each way); the custom
    #: op is opaque to fusion. Inductor options that act further are global, so left to the user:
    #: ``mode="max-autotune"`` (Triton GEMM templates, which can take the add into their epilogue) and
    #: ``torch._inductor.config.combo_kernels`` (independent small kernels, such as the casts, launched together).
    compiled_form: CompiledForm = "ops"
    #: What an initialization writes to the base layer when :meth:`attach` installs the adapter
    #: (:class:`~grafting_lora.init.Initialization`, set by ``init.start_from``); ``None``: nothing.
    initialization: Initialization | None = None

    lora_convertible = True
    #: PEFT's LoraLayer attributes (``layer.lora_A["default"]``); empty where this adapter has none (DoRA's vector).
    peft_attributes = (
        "lora_A",
        "lora_B",
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_magnitude_vector",
        "lora_dropout",
        "scaling",
        "r",
        "use_dora",
    )

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
        init_factors(self.lora_A.weight, self.lora_B.weight, init, r)
        if lora_bias:
            nn.init.zeros_(self.lora_B.bias)
        if use_dora:
            self.init_magnitude(base_layer, (n_out,), self.lora_A.weight.is_meta)

    def attach(self, base_layer: nn.Module) -> None:
        """Apply the :attr:`initialization`'s step on the base layer, once."""
        if self.initialization is not None:
            self.initialization.apply(base_layer, self.lora_A.weight, self.lora_B.weight, self.scaling)
            self.initialization = None

    @property
    def reads_base_weight(self) -> bool:  # type: ignore[override]
        """DoRA's merge rescales rows by norms of the weight it merges into (see ARCHITECTURE.md)."""
        return self.use_dora

    def delta_matrix(self) -> torch.Tensor:
        """``B·A·scaling`` as an (out, in) matrix."""
        return delta_weight(self.lora_A.weight, self.lora_B.weight, self.scaling)

    def _dtype(self, x: torch.Tensor) -> torch.dtype:
        # the hot-path methods read submodules from the module dict and parameters with _param: what
        # nn.Module.__getattr__ returns, without its chain of lookups
        return compute_dtype(self.precision, _param(self._modules["lora_A"], "weight").dtype, x, where="LoRA")

    # -- the reference ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        """The reference delta (:func:`~grafting_lora.reference.lora_delta`, DoRA's :func:`~grafting_lora.reference.dora_delta`).

        In the compute dtype: the layer adds it to the base output and rounds once.
        """
        dtype = self._dtype(x)
        h = self.lora_dropout(x.to(dtype))
        bias = None if self.lora_B.bias is None else self.lora_B.bias.to(dtype)
        out = low_rank(h, self.lora_A.weight.to(dtype), self.lora_B.weight.to(dtype), bias)
        if not self.use_dora:
            return out * self.scaling
        base = call.base_layer
        scale = self.magnitude_scale(wide(dense_weight(base).to(h.dtype)))
        return dora_delta(self._base_product(h, call), out, scale, self.scaling)

    def _base_product(self, h: torch.Tensor, call: LayerCall) -> torch.Tensor:
        """``W·h`` without the base bias: the base output where ``h`` is ``x``, else computed."""
        base = call.base_layer
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            # the base output in its own dtype: the product promotes, and autograd keeps no wider copy
            bias = getattr(base, "bias", None)
            return call.base_out if bias is None else call.base_out - bias
        return F.linear(h, dense_weight(base).to(h.dtype))  # with dropout: W·dropout(x), as PEFT computes it

    # -- fast paths ------------------------------------------------------------------------------
    def input_factor(self, x: torch.Tensor) -> torch.Tensor | None:
        """``A`` where this call's first product is ``x·Aᵀ`` in ``x``'s half precision (shared-input grouping).

        ``None`` (computed alone) for the reference (``fused = False``, float32/float64, ``precision =
        "adapter"``), for DoRA and when dropout is drawn on the input (each adapter its own mask).
        """
        if self.use_dora or not self.fused or x.dtype not in HALF_PRECISION:
            return None
        modules = self._modules
        drop = modules["lora_dropout"]
        if drop.training and not isinstance(drop, nn.Identity) and getattr(drop, "p", 1.0) > 0:
            return None
        return _param(modules["lora_A"], "weight") if self._dtype(x) == x.dtype else None

    def add_delta(
        self, y: torch.Tensor, x: torch.Tensor, call: LayerCall, product: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Fast path of ``y + forward(x)`` in half precision: :func:`~grafting_lora.reference.low_rank_add`.

        ``product`` is ``x·Aᵀ``, computed with the sibling layers' (:meth:`input_factor`).
        """
        dtype = self._dtype(x)
        modules = self._modules
        lora_b = modules["lora_B"]
        b = (_param(lora_b, "weight") * self.scaling).to(dtype)  # the scaling folded into the (out, r) matrix
        b_bias = _param(lora_b, "bias")
        bias = None if b_bias is None else (b_bias * self.scaling).to(dtype)
        if product is not None:  # input_factor answered: plain LoRA in x's half precision, no dropout
            return low_rank_add(y, None, None, b.to(y.dtype), bias, product.to(y.dtype))
        if not self.fused or dtype not in HALF_PRECISION or y.dtype != dtype:
            return y + self(x, call)
        h = modules["lora_dropout"](x.to(dtype))
        a = _param(modules["lora_A"], "weight").to(dtype)
        if not self.use_dora:
            return low_rank_add(y, h, a, b, bias)
        return self._dora_add(y, h, a, b, call)

    def _dora_add(
        self, y: torch.Tensor, h: torch.Tensor, a: torch.Tensor, b: torch.Tensor, call: LayerCall
    ) -> torch.Tensor:
        """Fast path of DoRA's ``y + dora_delta``: ``y + s·(W·h + lora) − W·h`` in the compute dtype.

        Alone on the layer (``y`` is the base output) and without dropout that is
        ``s·(y − bias + lora) + bias``: one product accumulated into the base output.
        """
        base = call.base_layer
        scale = self.magnitude_scale(wide(dense_weight(base))).to(h.dtype)
        bias = getattr(base, "bias", None)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            plain = call.base_out if bias is None else call.base_out - bias.to(y.dtype)  # W·x
            if y is call.base_out:
                out = low_rank_add(plain, h, a, b) * scale
                return out if bias is None else out + bias.to(y.dtype)
        else:  # with dropout the base product is of the dropped input: W·h, as PEFT computes it
            plain = F.linear(h, dense_weight(base).to(h.dtype))
        return y + low_rank_add(plain, h, a, b) * scale - plain

    def fused_call(
        self, base_layer: nn.Module, x: torch.Tensor, product: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Fast path of ``base(x) + forward(x)`` as one autograd node (:mod:`grafting_lora.fused`).

        Taken for a plain ``nn.Linear``/``Conv1D`` base (no hooks) in half precision, without
        ``lora_bias``, dropout included; else ``None`` (the layer composes as usual).
        ``product`` is ``x·Aᵀ`` computed with the sibling layers' (:meth:`input_factor`):
        the node takes it in place of its first product. Under ``torch.compile``
        :attr:`compiled_form` decides.
        """
        if not self.fused or x.dtype not in HALF_PRECISION:
            return None
        modules = self._modules
        lora_b = modules["lora_B"]
        if _param(lora_b, "bias") is not None:
            return None
        drop = modules["lora_dropout"]
        dropout = drop.p if type(drop) is nn.Dropout and drop.training else 0.0
        if dropout >= 1.0:  # all dropped: the composition
            return None
        form = self.compiled_form if torch.compiler.is_compiling() else "node"
        if form == "ops" or (form == "op" and self.use_dora):
            return None
        weight = plain_linear_weight(base_layer)
        if weight is None:
            return None
        bias = _param(base_layer, "bias")
        # a product was given only where input_factor answered, which it does only in x's dtype
        if weight.dtype != x.dtype or (product is None and self._dtype(x) != x.dtype):
            return None
        if self.use_dora:
            return self._dora_call(x, weight, bias, dropout)
        a, b = _param(modules["lora_A"], "weight"), _param(lora_b, "weight")
        if form == "op":
            return lora_linear_node(x, weight, bias, a, b, self.scaling, dropout)
        if not torch.is_grad_enabled() and not dropout:  # inference: the same kernels without a node's overhead
            return lora_linear(x, weight, bias, a, b, self.scaling, product, factor_casts(self))
        if product is not None:
            return LoraLinearFunction.apply(x, weight, bias, a, b, self.scaling, 0.0, product)
        if dropout and dropout_kernels.serves(x, a):  # Triton: the mask drawn in registers, never stored
            return dropout_kernels.LoraDropoutFunction.apply(x, weight, bias, a, b, self.scaling, dropout)
        return LoraLinearFunction.apply(x, weight, bias, a, b, self.scaling, dropout)

    def _dora_call(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dropout: float
    ) -> torch.Tensor:
        """DoRA's layer as one node (:class:`DoraLinearFunction`), with ``‖W‖²`` kept per weight version."""
        key = (weight_state(weight), weight.shape)
        kept = self.__dict__.get("_weight_sq")
        if kept is None or kept[0] != key:  # the frozen weight's squared row norms, once per version
            with torch.no_grad():
                kept = (key, torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square())
            self.__dict__["_weight_sq"] = kept
        a, b, m = self.lora_A.weight, self.lora_B.weight, self.lora_magnitude_vector
        if not torch.is_grad_enabled() and not dropout:
            _, _, scale, _, _ = row_scales(weight, a, b, kept[1], m, self.scaling)
            return dora_linear(x, weight, bias, a, b, scale, self.scaling)
        return DoraLinearFunction.apply(x, weight, bias, a, b, m, kept[1], self.scaling, dropout)

    @classmethod
    def add_grouped(
        cls, adapters: Sequence[DeltaAdapter], y: torch.Tensor, x: torch.Tensor, index: torch.Tensor, call: LayerCall
    ) -> torch.Tensor | None:
        """Fast path of routed plain LoRA adapters: :func:`~grafting_lora.routed.routed_lora_add`.

        ``y`` plus, for each sample ``i``, the delta of ``adapters[index[i]]`` (none where ``index[i]`` is -1):
        the adapters' ranks side by side (:mod:`grafting_lora.routed`); past
        :data:`~grafting_lora.routed.MAX_COLUMNS` of them, each sample's own factors gathered
        (:func:`~grafting_lora.reference.grouped_low_rank_add`).
        """
        loras = _routable(adapters, x, y.dtype)
        if loras is None:
            return None
        ranks = [a.r for a in loras]
        if sum(ranks) > MAX_COLUMNS:  # many adapters: each sample's own factors, gathered (padded stacks)
            stack_a, stack_b = _stacked(loras, y.dtype, y.device)
            slot = torch.where(index < 0, len(loras), index)
            return grouped_low_rank_add(y, x, slot, stack_a, stack_b)
        mask = column_mask(index, ranks, [a.scaling for a in loras], y.dtype)
        lora_a, lora_b = [a.lora_A.weight for a in loras], [a.lora_B.weight for a in loras]
        return routed_lora_add(y, x, mask, lora_a, lora_b, _side_by_side(loras, y.dtype, y.device))

    @classmethod
    def grouped_call(
        cls, adapters: Sequence[DeltaAdapter], base_layer: nn.Module, x: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor | None:
        """Fast path of ``base(x)`` plus routed plain LoRA adapters as one node (:func:`~grafting_lora.routed.routed_lora_linear_call`).

        Taken for a plain ``nn.Linear``/``Conv1D`` base in half precision, up to
        :data:`~grafting_lora.routed.MAX_COLUMNS` ranks side by side; else ``None`` (:meth:`add_grouped`).
        """
        if torch.compiler.is_compiling() and cls.compiled_form != "node":  # the routed node is traced only as "node"
            return None
        weight = plain_linear_weight(base_layer)
        if weight is None or weight.dtype != x.dtype:
            return None
        loras = _routable(adapters, x, x.dtype)
        if loras is None or sum(a.r for a in loras) > MAX_COLUMNS:
            return None
        mask = column_mask(index, [a.r for a in loras], [a.scaling for a in loras], x.dtype)
        lora_a, lora_b = [a.lora_A.weight for a in loras], [a.lora_B.weight for a in loras]
        kept = _side_by_side(loras, x.dtype, x.device)
        return routed_lora_linear_call(x, weight, base_layer.bias, mask, lora_a, lora_b, kept)

    # -- merging ---------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, base_layer: nn.Module) -> None:
        if self.use_dora:
            self.merge_magnitude(base_layer)
        else:
            add_to_weight(base_layer, self.delta_matrix())
        self._merge_bias(base_layer, 1.0)

    @torch.no_grad()
    def unmerge(self, base_layer: nn.Module) -> None:
        self._merge_bias(base_layer, -1.0)
        if self.use_dora:
            self.unmerge_magnitude(base_layer)
        else:
            add_to_weight(base_layer, self.delta_matrix(), alpha=-1.0)

    def _merge_bias(self, base_layer: nn.Module, sign: float) -> None:
        if self.lora_B.bias is None:
            return
        if getattr(base_layer, "bias", None) is None:
            raise MergeError(
                "Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias."
                f" (the base {type(base_layer).__name__} has none to add lora_B's {self.lora_B.bias.numel()} bias"
                " values to; the adapter stays unmerged and still runs in forward)"
            )
        base_layer.bias.add_(self.lora_B.bias.to(base_layer.bias.dtype), alpha=sign * self.scaling)


class LoraEmbedding(PairHotSwap, WeightDeltaAdapter):
    """``delta = embed(x, Aᵀ) · Bᵀ · scaling`` for ``nn.Embedding`` (saved as lora_embedding_A/B)."""

    lora_convertible = True
    peft_attributes = LoraLinear.peft_attributes

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
        return delta_weight(self.lora_embedding_A, self.lora_embedding_B, self.scaling)

    def forward(self, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        """:func:`~grafting_lora.reference.lora_delta` with ``A`` applied as the base layer looks rows up."""
        base: nn.Embedding = call.base_layer  # type: ignore[assignment]
        a, b = self.lora_embedding_A, self.lora_embedding_B
        lookup = F.embedding(
            x, a.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )
        out = (lookup @ b.T) * self.scaling
        scale = embed_scale(base)  # a scaled embedding (Gemma 3) scales its rows: the delta's too
        return out if scale is None else out * scale.to(device=out.device, dtype=out.dtype)


class LoraConv(PairHotSwap, DeltaAdapter):
    """``delta = B(A(dropout(x))) · scaling`` for ``nn.Conv1d/2d/3d``: A a conv, B a 1×1 conv.

    ``A`` convolves with the base layer's kernel, stride, padding and dilation; on a grouped
    base layer (``groups`` > 1, PEFT's layout) ``B`` is grouped the same way, the rank a
    multiple of the groups. Such an adapter's ``ΔW`` does not fit the grouped base weight:
    merging it is refused, as PEFT refuses it.
    """

    lora_convertible = True
    #: as :attr:`LoraLinear.precision`
    precision: Precision = "input"
    peft_attributes = LoraLinear.peft_attributes

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
        conv, groups = type(base_layer), base_layer.groups
        if r % groups:
            raise ConfigError(
                f"LoRA on a {conv.__name__} with groups={groups} needs a rank divisible by the groups (PEFT's rule),"
                f" got r={r}"
            )
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
        self.lora_B = conv(r, base_layer.out_channels, ones, ones, groups=groups, bias=lora_bias)
        init_factors(self.lora_A.weight, self.lora_B.weight, init, r)
        if lora_bias:
            nn.init.zeros_(self.lora_B.bias)

    def delta_matrix(self) -> torch.Tensor:
        """``B·A·scaling`` as an (out, in·k) matrix (on a grouped base: over all input channels)."""
        groups = self.lora_B.groups
        if groups == 1:
            return delta_weight(self.lora_A.weight, self.lora_B.weight, self.scaling)
        a = self.lora_A.weight.flatten(1).unflatten(0, (groups, -1))  # (groups, r/groups, in·k)
        b = self.lora_B.weight.flatten(1).unflatten(0, (groups, -1))  # (groups, out/groups, r/groups)
        return (b @ a).flatten(0, 1) * self.scaling

    def check_merge(self, base_layer: nn.Module) -> None:
        if self.lora_B.groups > 1:
            raise MergeError(
                f"a LoRA adapter on a {type(base_layer).__name__} with groups={self.lora_B.groups} cannot be merged:"
                " its ΔW spans all input channels, the grouped weight only its group's (PEFT refuses it too)"
            )

    def forward(self, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        dtype = compute_dtype(self.precision, self.lora_A.weight.dtype, x, where="LoRA")
        h = self.lora_dropout(x.to(dtype))
        return self._low_rank(h, dtype) * self.scaling

    def _low_rank(self, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``B(A(h)) + bias`` (unscaled) in ``dtype``: :func:`~grafting_lora.reference.low_rank` as convolutions."""
        bias = None if self.lora_B.bias is None else self.lora_B.bias.to(dtype)
        down, up = partial(convolve_as, self.lora_A), partial(convolve_as, self.lora_B)
        return low_rank(h, self.lora_A.weight.to(dtype), self.lora_B.weight.to(dtype), bias, down=down, up=up)

    @torch.no_grad()
    def merge(self, base_layer: nn.Module) -> None:
        self.check_merge(base_layer)
        add_to_weight(base_layer, self.delta_matrix())
        if self.lora_B.bias is not None:
            base_layer.bias.add_(self.lora_B.bias.to(base_layer.bias.dtype), alpha=self.scaling)

    @torch.no_grad()
    def unmerge(self, base_layer: nn.Module) -> None:
        add_to_weight(base_layer, self.delta_matrix(), alpha=-1.0)
        if self.lora_B.bias is not None:
            base_layer.bias.sub_(self.lora_B.bias.to(base_layer.bias.dtype) * self.scaling)
