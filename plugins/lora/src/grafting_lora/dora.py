"""DoRA on convolutions and embeddings: LoRA whose output channels are rescaled to a learned magnitude.

For a weight seen as an (out, in·k) matrix ``W`` (an embedding's is (dim, num)),
DoRA's layer computes with ``diag(m / ‖W + ΔW‖_rows) (W + ΔW)``, the norm
treated as a constant in backward. As a delta on the base output ``y = W x``:
``(s - 1) ⊙ y + s ⊙ ΔW x`` with ``s = m / ‖W + ΔW‖``, ``s`` broadcast over the
output channels. ``lora_magnitude_vector`` is saved in PEFT's shape: ``(dim,)``
for an embedding, ``(1, out, 1, ...)`` for a convolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from grafting import LayerCall, MergeError
from grafting.toolkit import dense_weight, store_weight
from grafting_lora.layers import LoraConv, LoraEmbedding, _wide


class _Dora:
    """Magnitude bookkeeping and the merge shared by DoRA's conv and embedding adapters.

    The host class provides ``delta_matrix()`` (the scaled ΔW as an (out, in·k) matrix) and
    holds ``lora_magnitude_vector``; ``_dora_merge_scale`` remembers the factor a merge applied.
    """

    reads_base_weight = True  # its merge rescales rows by norms of the layer's own weight
    lora_magnitude_vector: nn.Parameter
    _dora_merge_scale: torch.Tensor | None

    def _init_magnitude(self, base_layer: nn.Module, shape: tuple[int, ...], meta: bool) -> None:
        self._dora_merge_scale = None
        if meta:  # created for loading: the file holds the magnitude
            self.lora_magnitude_vector = nn.Parameter(torch.empty(shape, device="meta"))
            return
        with torch.no_grad():
            weight = _wide(dense_weight(base_layer))
            norm = self._row_norm(weight)
        self.lora_magnitude_vector = nn.Parameter(norm.reshape(shape))

    def _row_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """``‖W + ΔW‖`` per output channel, in ``weight``'s dtype."""
        return torch.linalg.vector_norm(weight + self.delta_matrix().to(weight), dim=1)  # type: ignore[attr-defined]

    def _scale(self, dtype: torch.dtype, base_layer: nn.Module) -> torch.Tensor:
        """``m / ‖W + ΔW‖`` per output channel, the norm without a graph (DoRA's constant)."""
        with torch.no_grad():
            norm = self._row_norm(dense_weight(base_layer).to(dtype))
        return self.lora_magnitude_vector.flatten() / norm

    @torch.no_grad()
    def merge(self, base_layer: nn.Module) -> None:
        weight = _wide(dense_weight(base_layer))
        merged = weight + self.delta_matrix().to(weight)
        scale = self.lora_magnitude_vector.flatten().to(weight) / torch.linalg.vector_norm(merged, dim=1)
        self._dora_merge_scale = scale
        store_weight(base_layer, scale[:, None] * merged)

    @torch.no_grad()
    def unmerge(self, base_layer: nn.Module) -> None:
        if self._dora_merge_scale is None:
            raise MergeError("DoRA adapter was not merged by this process; cannot unmerge it")
        weight = _wide(dense_weight(base_layer))
        store_weight(base_layer, weight / self._dora_merge_scale[:, None] - self.delta_matrix().to(weight))
        self._dora_merge_scale = None


class DoraConv(_Dora, LoraConv):
    """DoRA for ``nn.Conv1d/2d/3d``; the magnitude has PEFT's shape ``(1, out, 1, ...)``."""

    def __init__(
        self,
        base_layer: nn.modules.conv._ConvNd,
        r: int,
        scaling: float,
        dropout: float = 0.0,
        init: bool | str = True,
    ) -> None:
        super().__init__(base_layer, r, scaling, dropout, init)
        shape = (1, base_layer.out_channels) + (1,) * len(base_layer.kernel_size)
        self._init_magnitude(base_layer, shape, self.lora_A.weight.is_meta)

    def forward(self, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        base = call.base_layer
        h = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        scale = self._scale(h.dtype, base)
        scale = scale.view(-1, *(1,) * (h.dim() - 2))  # over the channel dimension
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_out = call.base_out
            if base.bias is not None:
                base_out = base_out - base.bias.view(-1, *(1,) * (base_out.dim() - 2))
        else:  # the base layer on the dropped-out input, without its bias
            conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[h.dim() - 2]
            base_out = conv(h, base.weight.to(h.dtype), None, base.stride, base.padding, base.dilation, base.groups)
        return (scale - 1) * base_out + scale * self.lora_B(self.lora_A(h)) * self.scaling


class DoraEmbedding(_Dora, LoraEmbedding):
    """DoRA for ``nn.Embedding``: the magnitude scales the embedding dimensions, shape ``(dim,)``."""

    def __init__(self, base_layer: nn.Embedding, r: int, scaling: float, init: bool | str = True) -> None:
        super().__init__(base_layer, r, scaling, init)
        self._init_magnitude(base_layer, (base_layer.embedding_dim,), self.lora_embedding_A.is_meta)

    def forward(self, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        lora_out = super().forward(x, call)
        scale = self._scale(lora_out.dtype, call.base_layer)
        return (scale - 1) * call.base_out + scale * lora_out
