"""DoRA on convolutions and embeddings: LoRA whose output channels are rescaled to a learned magnitude.

The computation is :mod:`grafting_lora.reference`'s (``dora_delta``, ``dora_merge``), the
magnitude's bookkeeping :class:`~grafting_lora.magnitude.DoraMagnitude`, both shared with
``LoraLinear``'s DoRA. ``lora_magnitude_vector`` is saved in PEFT's shape: ``(dim,)`` for an
embedding, ``(1, out, 1, ...)`` for a convolution.
"""

from __future__ import annotations

import torch
from torch import nn

from grafting import LayerCall
from grafting.toolkit import convolve_as, dense_weight
from grafting_lora.layers import LoraConv, LoraEmbedding
from grafting_lora.magnitude import DoraMagnitude
from grafting_lora.reference import dora_delta


class DoraConv(DoraMagnitude, LoraConv):
    """DoRA for ``nn.Conv1d/2d/3d``; the magnitude has PEFT's shape ``(1, out, 1, ...)``.

    On a grouped convolution the row norms are PEFT's: ``‖W + B·A·scaling‖`` with ``B·A``
    (out/groups · r … r · in·k) laid out in the grouped weight's shape, so PEFT's files give PEFT's
    outputs; such an adapter is not merged (as :class:`LoraConv`).
    """

    reads_base_weight = True  # its merge rescales rows by norms of the layer's own weight

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
        self.init_magnitude(base_layer, shape, self.lora_A.weight.is_meta)

    def norm_delta(self) -> torch.Tensor:
        if self.lora_B.groups == 1:
            return self.delta_matrix()
        product = self.lora_B.weight.reshape(-1, self.r) @ self.lora_A.weight.reshape(self.r, -1)
        return product.reshape(self.lora_B.out_channels, -1) * self.scaling

    def forward(self, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        base = call.base_layer
        h = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        scale = self.magnitude_scale(dense_weight(base).to(h.dtype))
        scale = scale.view(-1, *(1,) * (h.dim() - 2))  # over the channel dimension
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_out = call.base_out
            if base.bias is not None:
                base_out = base_out - base.bias.view(-1, *(1,) * (base_out.dim() - 2))
        else:  # the base layer on the dropped-out input, without its bias
            base_out = convolve_as(base, h, base.weight.to(h.dtype))
        return dora_delta(base_out, self._low_rank(h, h.dtype), scale, self.scaling)

    def merge(self, base_layer: nn.Module) -> None:
        self.check_merge(base_layer)
        self.merge_magnitude(base_layer)

    def unmerge(self, base_layer: nn.Module) -> None:
        self.unmerge_magnitude(base_layer)


class DoraEmbedding(DoraMagnitude, LoraEmbedding):
    """DoRA for ``nn.Embedding``: the magnitude scales the embedding dimensions, shape ``(dim,)``."""

    reads_base_weight = True

    def __init__(self, base_layer: nn.Embedding, r: int, scaling: float, init: bool | str = True) -> None:
        super().__init__(base_layer, r, scaling, init)
        self.init_magnitude(base_layer, (base_layer.embedding_dim,), self.lora_embedding_A.is_meta)

    def forward(self, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        lora_out = super().forward(x, call)  # scaled
        scale = self.magnitude_scale(dense_weight(call.base_layer).to(lora_out.dtype))
        return dora_delta(call.base_out, lora_out, scale)

    def merge(self, base_layer: nn.Module) -> None:
        self.merge_magnitude(base_layer)

    def unmerge(self, base_layer: nn.Module) -> None:
        self.unmerge_magnitude(base_layer)
