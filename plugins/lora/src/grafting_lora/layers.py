"""LoRA adapters for linear, embedding and convolution layers (DoRA on linear ones)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from grafting import DeltaAdapter, LayerCall, MergeError
from grafting.toolkit import add_to_weight, dense_weight, in_out_features, store_weight
from grafting_lora.scaled import embed_scale


def _init_pair(a: torch.Tensor, b: torch.Tensor, init: bool | str, r: int) -> None:
    """A random, B zero (so the adapter starts as the identity), unless ``init`` is False."""
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


class LoraLinear(DeltaAdapter):
    """``delta = B(A(dropout(x))) · scaling`` for ``nn.Linear`` and ``Conv1D``; DoRA optional."""

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

    @property
    def reads_base_weight(self) -> bool:  # type: ignore[override]
        """DoRA's merge rescales rows by norms of the weight it merges into (see ARCHITECTURE.md)."""
        return self.use_dora

    def delta_matrix(self) -> torch.Tensor:
        """``B·A·scaling`` as an (out, in) matrix."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def _weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        delta = (self.lora_B.weight.to(weight) @ self.lora_A.weight.to(weight)) * self.scaling  # in weight's dtype
        return torch.linalg.vector_norm(weight + delta, dim=1)

    def forward(self, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        dtype = self.lora_A.weight.dtype
        h = self.lora_dropout(x.to(dtype))
        out = self.lora_B(self.lora_A(h))
        out = self._dora(h, out, call) if self.use_dora else out * self.scaling
        return out  # in the adapter's dtype: the layer adds it to the base output and rounds once

    def _dora(self, h: torch.Tensor, lora_out: torch.Tensor, call: LayerCall) -> torch.Tensor:
        """DoRA's delta; ``lora_out`` is ``B(A(h))`` unscaled, multiplied in PEFT's order (same bits)."""
        base = call.base_layer
        with torch.no_grad():  # DoRA treats the norm as a constant: no graph, nothing saved for backward
            norm = self._weight_norm(dense_weight(base).to(h.dtype))
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

    def forward(self, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        h = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        return self.lora_B(self.lora_A(h)) * self.scaling

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
