"""The grafting plugin for BOFT: declares the method, builds its layer adapters, checks saved shapes."""

from __future__ import annotations

from torch import nn

from grafting import Method, UnsupportedLayerError, hookimpl
from grafting.toolkit import query_value_projections, warn_fan_in_fan_out
from grafting_boft.butterfly import layout
from grafting_boft.config import BOFTConfig
from grafting_boft.layers import BOFTAdapter, BOFTConv2d, BOFTLinear


@hookimpl
def grafting_methods() -> list[Method]:
    return [
        Method(
            peft_type="BOFT",
            name="boft",
            config_class=BOFTConfig,
            description="Butterfly orthogonal finetuning (BOFT): butterfly products of block rotations",
        )
    ]


@hookimpl
def grafting_default_target_modules(model: nn.Module) -> list[str] | None:
    return query_value_projections(model)


def _options(config: BOFTConfig, n: int, where: str) -> dict[str, int | float | bool]:
    factors = config.boft_n_butterfly_factor
    blocks, size = layout(n, config.boft_block_size, config.boft_block_num, factors, where)
    return {
        "factors": factors,
        "blocks": blocks,
        "size": size,
        "dropout": config.boft_dropout,
        "init_weights": config.init_weights,
    }


@hookimpl
def grafting_create_layer_adapter(config: BOFTConfig, base_layer: nn.Module, module_name: str) -> BOFTAdapter | None:
    if isinstance(base_layer, nn.Linear):
        warn_fan_in_fan_out(config, base_layer)
        options = _options(config, base_layer.in_features, module_name)
        return BOFTLinear(n_out=base_layer.out_features, conv=False, **options)  # type: ignore[arg-type]
    if isinstance(base_layer, nn.Conv2d):
        height, width = base_layer.kernel_size
        if base_layer.groups != 1 or height != width:
            raise UnsupportedLayerError(
                f"{module_name}: BOFT (as PEFT) adapts Conv2d layers with a square kernel and groups=1; this one"
                f" has kernel {tuple(base_layer.kernel_size)}, groups={base_layer.groups}"
            )
        options = _options(config, base_layer.in_channels * height * width, module_name)
        return BOFTConv2d(n_out=base_layer.out_channels, conv=True, **options)  # type: ignore[arg-type]
    return None  # GPT-2's Conv1D, embeddings, Conv1d/3d: not in PEFT's BOFT either


@hookimpl
def grafting_check_saved_shapes(config: BOFTConfig, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    problems = []
    factors, size, count = config.boft_n_butterfly_factor, config.boft_block_size, config.boft_block_num
    for key, shape in sorted(shapes.items()):
        if key.endswith(".boft_R"):
            if len(shape) != 4 or shape[2] != shape[3]:
                problems.append(f"{key}: shape {list(shape)} is not (factors, blocks, b, b)")
            elif shape[0] != factors:
                problems.append(f"{key}: {shape[0]} factors, but the config says boft_n_butterfly_factor={factors}")
            elif (size and shape[2] != size) or (count and shape[1] != count):
                problems.append(
                    f"{key}: {shape[1]} blocks of {shape[2]}, but the config says boft_block_size={size},"
                    f" boft_block_num={count}"
                )
        elif key.endswith(".boft_s") and (len(shape) != 2 or 1 not in shape):
            problems.append(f"{key}: shape {list(shape)} is not (out, 1) or (1, out)")
    return problems
