"""LoftQ: start LoRA on the quantization error of the base weight (``init_lora_weights="loftq"``).

The base weight ``W`` is replaced by ``Q``, its quantized-and-dequantized self (NF4 in blocks of
64 for 4 bits, row-wise absmax int8 for 8 bits, bitsandbytes' codecs), and the adapter starts on
the best rank-r approximation ``L·R`` of ``W − Q``. With ``loftq_iter > 1`` the two steps
alternate: the next ``Q`` quantizes ``W − L·R``. As in PEFT, ``A = R`` and ``B = L`` are not
divided by the scaling, so ``Q + s·B·A ≈ W`` holds for ``lora_alpha = r`` (LoftQ's recipes).

For a model already loaded in 4 bits (QLoRA), :func:`replace_lora_weights_loftq` computes the
factors from the original weights in a safetensors file and the layer's own quantized weight.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from grafting import AdaptedLayer, ConfigError
from grafting.toolkit import candidate_modules, dense_weight, is_hf_conv1d


def _bitsandbytes() -> Any:
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as error:  # pragma: no cover - bitsandbytes is installed wherever LoftQ is tested
        raise ConfigError(
            "LoraConfig.init_lora_weights='loftq' quantizes with bitsandbytes: pip install bitsandbytes"
        ) from error
    return bnbf


def quantize_roundtrip(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``weight`` (float32, (out, in)) quantized to NF4 (``bits=4``) or int8 (8) and dequantized back."""
    bnbf = _bitsandbytes()
    dense = weight.contiguous()
    if bits == 4:
        packed, state = bnbf.quantize_4bit(dense, blocksize=64, compress_statistics=False, quant_type="nf4")
        return bnbf.dequantize_4bit(packed, state).to(weight.dtype)
    codes, scales, _ = bnbf.int8_vectorwise_quant(dense)
    return bnbf.int8_vectorwise_dequant(codes, scales).to(weight.dtype)


def low_rank(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with ``B·A`` the best rank-r approximation of ``matrix``, the singular values split evenly."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:r].sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]


@torch.no_grad()
def loftq(weight: torch.Tensor, r: int, bits: int, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q, A, B) for a dense (out, in) ``weight``: Q in the weight's dtype, the factors in float32."""
    w = weight.float()
    target = w
    for step in range(iters):
        q = quantize_roundtrip(target, bits)
        a, b = low_rank(w - q, r)
        if step + 1 < iters:
            target = w - b @ a
    return q.to(weight.dtype), a, b


def initialize_loftq(adapter: nn.Module, base_layer: nn.Module, loftq_config: dict[str, Any], r: int) -> None:
    """LoftQ factors for a linear adapter; ``attach`` then stores Q in the base."""
    from grafting_lora.init import start_from

    weight = getattr(base_layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise ConfigError(
            "LoraConfig.init_lora_weights='loftq' quantizes a float model itself; for a model loaded quantized,"
            " create the adapter with init_lora_weights=True and call replace_lora_weights_loftq"
        )
    q, a, b = loftq(dense_weight(base_layer), r, loftq_config["loftq_bits"], loftq_config["loftq_iter"])
    start_from(adapter, base_layer, a, b, new_base=q)


# -- QLoRA: a model loaded in 4 bits ------------------------------------------------------------------
class _SafetensorsWeights:
    """Tensors of a (possibly sharded) safetensors checkpoint, read one at a time."""

    def __init__(self, model: nn.Module, model_path: str | os.PathLike[str] | None) -> None:
        if model_path is None:
            name = getattr(getattr(model, "config", None), "_name_or_path", None)
            if not name:
                raise ConfigError(
                    "replace_lora_weights_loftq: the model names no checkpoint (config._name_or_path); pass model_path"
                )
            if os.path.isdir(name):
                model_path = name
            else:
                from huggingface_hub import snapshot_download

                model_path = snapshot_download(name, local_files_only=True)
        path = Path(model_path)
        folder = path if path.is_dir() else path.parent
        single = path if path.is_file() else folder / "model.safetensors"
        self.files: dict[str, Path] = {}
        if single.is_file():
            self.default: Path | None = single
        else:
            index = folder / "model.safetensors.index.json"
            if not index.is_file():
                raise ConfigError(f"replace_lora_weights_loftq: no model.safetensors (or its index) in {folder}")
            self.default = None
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.files = {key: folder / file for key, file in weight_map.items()}
        self.prefix = getattr(model, "base_model_prefix", "") or ""

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        candidates = [key]
        if self.prefix and key.startswith(self.prefix + "."):
            candidates.append(key[len(self.prefix) + 1 :])
        for name in candidates:
            file = self.default or self.files.get(name)
            if file is None:
                continue
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                if name in handle.keys():  # noqa: SIM118 - safe_open has keys(), no __contains__
                    return handle.get_tensor(name)
        raise ConfigError(f"replace_lora_weights_loftq: the checkpoint holds no {key}")


@torch.no_grad()
def replace_lora_weights_loftq(
    peft_model: nn.Module,
    model_path: str | None = None,
    adapter_name: str = "default",
    callback: Callable[[nn.Module, str], bool] | None = None,
) -> None:
    """LoftQ factors for the LoRA adapter ``adapter_name`` on every quantized linear layer of ``peft_model``.

    The original (unquantized) weights are read from ``model_path`` (a safetensors file or folder,
    sharded or not; by default the model's own checkpoint in the local Hugging Face cache). Each
    layer gets ``B·A`` = the rank-r SVD of ``W − Q``, Q the layer's dequantized weight; the base is
    not touched. ``callback(peft_model, module_name)`` is asked after each layer: ``False`` puts the
    layer's previous factors back (a greedy check that the error went down).
    """
    from grafting_lora.layers import LoraLinear

    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    weights = _SafetensorsWeights(base, model_path)
    found = False
    for name, module in candidate_modules(base):
        if not isinstance(module, AdaptedLayer) or adapter_name not in module.adapters:
            continue
        adapter = module.adapters[adapter_name]
        layer = module.base_layer
        if not isinstance(adapter, LoraLinear) or layer.weight.is_floating_point():
            continue
        found = True
        original = weights.get(f"{name}.weight").float()
        original = original.T if is_hf_conv1d(layer) else original
        quantized = dense_weight(layer).float()
        a, b = low_rank(original.to(quantized.device) - quantized, adapter.r)
        before = adapter.lora_A.weight.detach().clone(), adapter.lora_B.weight.detach().clone()
        adapter.lora_A.weight.copy_(a)
        adapter.lora_B.weight.copy_(b)
        if callback is not None and not callback(peft_model, name):
            adapter.lora_A.weight.copy_(before[0])
            adapter.lora_B.weight.copy_(before[1])
    if not found:
        raise ConfigError(
            f"replace_lora_weights_loftq: no LoRA adapter {adapter_name!r} on a quantized linear layer in the model"
        )
