"""The grafting plugin for OFT: declares the method, builds its layer adapters, checks saved shapes."""

from __future__ import annotations

import math

from torch import nn

from grafting import Method, UnsupportedLayerError, hookimpl
from grafting.toolkit import query_value_projections, warn_fan_in_fan_out
from grafting_oft.config import OFTConfig
from grafting_oft.layers import OFTConv2d, OFTEmbedding, OFTLinear, OFTRotation
from grafting_oft.rotation import block_layout


@hookimpl
def grafting_methods() -> list[Method]:
    return [
        Method(
            peft_type="OFT",
            name="oft",
            config_class=OFTConfig,
            description="Orthogonal finetuning (OFT): block-diagonal Cayley rotations of the layer's input",
        )
    ]


@hookimpl
def grafting_default_target_modules(model: nn.Module) -> list[str] | None:
    return query_value_projections(model)


def _rotation(config: OFTConfig, n: int, where: str) -> OFTRotation:
    blocks, size = block_layout(n, config.r, config.oft_block_size, where)
    return OFTRotation(
        blocks,
        size,
        share=config.block_share,
        coft=config.coft,
        eps=config.eps,
        neumann_terms=config.num_cayley_neumann_terms if config.use_cayley_neumann else None,
        dropout=config.module_dropout,
        init_weights=config.init_weights,
    )


def _check_conv(layer: nn.Conv2d, where: str) -> int:
    """The rotated size ``in·k·k`` of a convolution PEFT's OFT can hold, or UnsupportedLayerError."""
    height, width = layer.kernel_size
    if layer.groups != 1 or height != width or any(d != 1 for d in layer.dilation):
        raise UnsupportedLayerError(
            f"{where}: OFT (as PEFT) adapts Conv2d layers with a square kernel, groups=1 and dilation=1;"
            f" this one has kernel {tuple(layer.kernel_size)}, groups={layer.groups}, dilation={tuple(layer.dilation)}"
        )
    return layer.in_channels * height * width


@hookimpl
def grafting_create_layer_adapter(config: OFTConfig, base_layer: nn.Module, module_name: str) -> nn.Module | None:
    if isinstance(base_layer, nn.Linear):
        warn_fan_in_fan_out(config, base_layer)
        return OFTLinear(_rotation(config, base_layer.in_features, module_name))
    if isinstance(base_layer, nn.Embedding):
        return OFTEmbedding(_rotation(config, base_layer.embedding_dim, module_name))
    if isinstance(base_layer, nn.Conv2d):
        return OFTConv2d(_rotation(config, _check_conv(base_layer, module_name), module_name))
    return None  # GPT-2's Conv1D, Conv1d/3d: not in PEFT's OFT either


@hookimpl
def grafting_check_saved_shapes(config: OFTConfig, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    problems = []
    for key, shape in sorted(shapes.items()):
        if not key.endswith((".oft_R.weight", ".oft_embedding_R.weight")):
            continue
        size = (1 + math.isqrt(1 + 8 * shape[-1])) // 2 if len(shape) == 2 else 0
        if len(shape) != 2 or size * (size - 1) // 2 != shape[1]:
            problems.append(f"{key}: shape {list(shape)} is not (blocks, b·(b-1)/2) for any block size b")
        elif config.block_share and shape[0] != 1:
            problems.append(f"{key}: {shape[0]} blocks, but block_share=True keeps one")
    return problems
