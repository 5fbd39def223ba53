"""OFT's trained rotation and its adapters for linear, embedding and 2-d convolution layers.

Parameters carry PEFT's on-disk names: ``oft_R.weight`` (linear, convolution) and
``oft_embedding_R.weight`` (embedding), each of shape (blocks, b(b-1)/2), or (1, ...) with
``block_share``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from grafting import ConfigError, DeltaAdapter, InputAdapter, LayerCall, MergeError, OutputAdapter
from grafting.toolkit import convolve_as, dense_weight, fit_state, require_same, store_weight, zeros_state
from grafting_oft.rotation import cayley, constrain, dense, rotate, skew

Precision = Literal["adapter", "input"]
PRECISIONS: tuple[str, ...] = ("adapter", "input")


class OFTRotation(nn.Module):
    """The trained upper triangles of one layer's skew blocks (``weight``) and the rotations they give."""

    def __init__(
        self,
        blocks: int,
        size: int,
        *,
        share: bool = False,
        coft: bool = False,
        eps: float = 6e-5,
        neumann_terms: int | None = 5,
        dropout: float = 0.0,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        self.blocks, self.size = blocks, size
        self.coft, self.eps, self.neumann_terms, self.dropout = coft, eps, neumann_terms, dropout
        self.weight = nn.Parameter(torch.empty(1 if share else blocks, size * (size - 1) // 2))
        rows, cols = torch.triu_indices(size, size, 1, device="cpu")  # explicit: real even while loading
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        with torch.no_grad():
            if init_weights:
                self.weight.zero_()
            else:
                self.weight.normal_(0.0, 0.1)

    def matrices(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (k, b, b) orthogonal blocks (k = 1 when shared), from the weight in ``dtype`` (default its own).

        With ``coft`` the weight is first projected in place, as PEFT does on every call; in
        training, ``dropout`` replaces that fraction of the (unshared) blocks by the identity.
        """
        if self.coft:
            with torch.no_grad():
                self.weight.copy_(constrain(self.weight, self.eps, self.size))
        vec = self.weight if dtype is None else self.weight.to(dtype)
        blocks = cayley(skew(vec, self.rows, self.cols, self.size), self.neumann_terms)
        if self.training and self.dropout > 0 and blocks.shape[0] > 1:
            count = blocks.shape[0]
            dropped = (torch.randperm(count) < int(self.dropout * count)).to(blocks.device)
            eye = torch.eye(self.size, dtype=blocks.dtype, device=blocks.device)
            blocks = torch.where(dropped[:, None, None], eye, blocks)
        return blocks

    def matrix(self) -> torch.Tensor:
        """The whole (n, n) block-diagonal rotation (reference path: tests compare the fast one with it)."""
        return dense(self.matrices(), self.blocks)


class _Rotating:
    """What the three adapters share: the compute dtype, and merges that keep the weight they replace."""

    rotation: OFTRotation
    #: For a bf16/fp16 input and float32 weights (outside autocast): ``"input"`` rotates in the
    #: input's dtype, the blocks cast down, as autocast would; ``"adapter"`` casts the input up
    #: and rotates in float32, as PEFT does. The trained weights stay float32 either way.
    precision: Precision = "input"

    def __setattr__(self, name: str, value: object) -> None:
        if name == "precision" and value not in PRECISIONS:
            raise ConfigError(f"{type(self).__name__}.precision must be one of {list(PRECISIONS)}, got {value!r}")
        super().__setattr__(name, value)  # type: ignore[misc]

    # -- hot-swapping: the blocks (r, oft_block_size, block_share) are no rank, so nothing pads --
    def pad_rank(self, rank: int) -> None:
        """Nothing to grow: OFT's block size is not a rank."""

    def hotswap_values(self, tensors: dict[str, torch.Tensor], config: Any, module_name: str) -> dict[str, Any]:
        rotation = self.rotation
        neumann = config.num_cayley_neumann_terms if config.use_cayley_neumann else None
        for what, new, loaded in (
            ("coft", bool(config.coft), rotation.coft),
            ("eps", float(config.eps), rotation.eps),
            ("Cayley-Neumann terms", neumann, rotation.neumann_terms),
            ("module_dropout", float(config.module_dropout), rotation.dropout),
        ):
            require_same(what, new, loaded)
        fixed = "OFT's blocks (r, oft_block_size, block_share) are not a rank: a hot-swap cannot change them"
        return fit_state(self, tensors, fixed=fixed)  # type: ignore[arg-type]

    def hotswap_blank_values(self, base_layer: nn.Module) -> dict[str, torch.Tensor]:
        """The skew blocks zero: their rotation is the identity, exactly (Cayley's ``(I − 0)(I + 0)⁻¹`` and the
        Neumann series ``I + 0`` alike; COFT's projection keeps zero), so the layer computes its base output."""
        return zeros_state(self)  # type: ignore[arg-type]

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        own = self.rotation.weight.dtype
        if torch.is_autocast_enabled(x.device.type) and torch.float64 not in (own, x.dtype):
            return torch.get_autocast_dtype(x.device.type)
        if self.precision == "input" and x.dtype in (torch.float16, torch.bfloat16) and own.itemsize > x.dtype.itemsize:
            return x.dtype
        return own

    def rotated(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``x`` rotated block by block in the compute dtype (``transpose``: by the transposed blocks)."""
        dtype = self.compute_dtype(x)
        blocks = self.rotation.matrices().to(dtype)
        return rotate(x.to(dtype), blocks.transpose(1, 2) if transpose else blocks)

    @torch.no_grad()
    def merged_matrix(self, matrix: torch.Tensor, transpose: bool) -> torch.Tensor:
        """``matrix``'s rows rotated in float32 (or wider), the blocks formed there too: rounded once, on store."""
        wide = torch.promote_types(matrix.dtype, torch.float32)
        blocks = self.rotation.matrices(wide)
        return rotate(matrix.to(wide), blocks.transpose(1, 2) if transpose else blocks)

    @torch.no_grad()
    def keep_and_store(self, base_layer: nn.Module, new: torch.Tensor, as_stored: torch.Tensor) -> None:
        self.__dict__["replaced"] = as_stored.detach().clone()
        store_weight(base_layer, new)

    @torch.no_grad()
    def restore(self, base_layer: nn.Module) -> None:
        """Unmerge: the weight the merge replaced, bit for bit (kept at merge time, dropped here)."""
        kept = self.__dict__.pop("replaced", None)
        if kept is None:
            raise MergeError(f"{type(self).__name__} was not merged into this {type(base_layer).__name__}")
        store_weight(base_layer, kept)


class OFTLinear(_Rotating, InputAdapter):
    """OFT on ``nn.Linear``: the input rotated block-wise, ``x'_i = x_i · R_i``, before the unchanged base matmul."""

    def __init__(self, rotation: OFTRotation) -> None:
        super().__init__()
        self.oft_R = rotation

    @property
    def rotation(self) -> OFTRotation:  # type: ignore[override]
        return self.oft_R

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotated(x).to(x.dtype)

    def merge(self, base_layer: nn.Module) -> None:
        weight = dense_weight(base_layer)  # (out, in): W' = W·diag(R_i)ᵀ
        self.keep_and_store(base_layer, self.merged_matrix(weight, transpose=True), weight)

    def unmerge(self, base_layer: nn.Module) -> None:
        self.restore(base_layer)


class OFTEmbedding(_Rotating, OutputAdapter):
    """OFT on ``nn.Embedding``: each looked-up vector rotated block-wise, ``e'_i = e_i · R_i``."""

    def __init__(self, rotation: OFTRotation) -> None:
        super().__init__()
        self.oft_embedding_R = rotation

    @property
    def rotation(self) -> OFTRotation:  # type: ignore[override]
        return self.oft_embedding_R

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.rotated(y).to(y.dtype)

    def merge(self, base_layer: nn.Module) -> None:
        weight = dense_weight(base_layer)  # (dim, num): the table's rows rotated, E' = E·diag(R_i)
        self.keep_and_store(base_layer, self.merged_matrix(weight.T, transpose=False).T, weight)

    def unmerge(self, base_layer: nn.Module) -> None:
        self.restore(base_layer)


class OFTConv2d(_Rotating, DeltaAdapter):
    """OFT on ``nn.Conv2d``: the kernel's (in·k·k) rows rotated, ``W' = W·diag(R_i)ᵀ``, the convolution run with it.

    A rotation of each input patch has no form on the input image itself (patches overlap), so
    the weight is rotated; a convolution's weight is small next to its activations. Alone on
    its layer the adapter runs one convolution with ``W'`` (:meth:`fused_call`); beside other
    adapters it adds ``conv(x, W' − W)``. Its merge reads the layer's own weight.
    """

    reads_base_weight = True

    def __init__(self, rotation: OFTRotation) -> None:
        super().__init__()
        self.oft_R = rotation

    @property
    def rotation(self) -> OFTRotation:  # type: ignore[override]
        return self.oft_R

    def rotated_weight(self, base_layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        weight = base_layer.weight
        return self.rotated(weight.flatten(1), transpose=True).reshape(weight.shape).to(self.compute_dtype(x))

    def forward(self, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        base = call.base_layer
        dtype = self.compute_dtype(x)
        delta = self.rotated_weight(base, x) - base.weight.to(dtype)
        return convolve_as(base, x.to(dtype), delta, None)

    def fused_call(self, base_layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        if not isinstance(base_layer, nn.Conv2d) or base_layer._forward_hooks or base_layer._forward_pre_hooks:
            return None
        dtype = self.compute_dtype(x)
        bias = None if base_layer.bias is None else base_layer.bias.to(dtype)
        return convolve_as(base_layer, x.to(dtype), self.rotated_weight(base_layer, x), bias).to(x.dtype)

    def merge(self, base_layer: nn.Module) -> None:
        weight = dense_weight(base_layer)  # (out, in·k·k)
        self.keep_and_store(base_layer, self.merged_matrix(weight, transpose=True), weight)

    def unmerge(self, base_layer: nn.Module) -> None:
        self.restore(base_layer)


__all__ = ["OFTConv2d", "OFTEmbedding", "OFTLinear", "OFTRotation"]
