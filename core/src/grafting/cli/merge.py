"""Merge adapters into their base model and write a standalone transformers model folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from grafting import PeftModel
from grafting.cli.common import CommandError, adapter_folder, human_size
from grafting.config.adapter_config import load_config
from grafting.config.tasks import task_of
from grafting.io.transaction import is_bookkeeping, save_transaction

DTYPES = ("auto", "float32", "float16", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, metavar="MODEL", help="a transformers model folder or a .gguf file")
    parser.add_argument(
        "--adapter",
        required=True,
        action="append",
        metavar="PATH",
        help="an adapter folder; repeat to merge several (of one method or of several)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write the merged model to")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (auto: the base's own)")
    parser.add_argument("--force", action="store_true", help="write into DIR even if it is not empty")


def model_class(task_type: str | None, architectures: list[str] | None) -> Any:
    """The class to load the base with: from the adapter's task type, else the checkpoint's architecture."""
    import transformers

    task = task_of(task_type)
    if task is not None:
        return getattr(transformers, task.auto_class)
    for name in architectures or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModel


def load_base(base: str, task_type: str | None, dtype: str) -> tuple[Any, Any]:
    """(model, tokenizer or None) from a model folder or a GGUF file (dequantized, so it can be saved)."""
    import transformers

    path = Path(base).expanduser()
    if not path.exists():
        raise CommandError(f"base model {base} does not exist")
    torch_dtype: Any = "auto" if dtype == "auto" else getattr(torch, dtype)
    if path.is_file():
        if path.suffix != ".gguf":
            raise CommandError(f"base model {base} is a file but not a .gguf file")
        kwargs: dict[str, Any] = {"gguf_file": path.name}
        klass = model_class(task_type, None)
        if klass is transformers.AutoModel:
            klass = transformers.AutoModelForCausalLM
        model = klass.from_pretrained(path.parent, dtype=torch.float32 if dtype == "auto" else torch_dtype, **kwargs)
        model.hf_quantizer = None  # dequantized on load: a plain checkpoint from here on
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = path.stem
    else:
        if not (path / "config.json").is_file():
            raise CommandError(f"base model {base} is not a transformers model folder (no config.json)")
        config = transformers.AutoConfig.from_pretrained(path)
        kwargs = {}
        klass = model_class(task_type, getattr(config, "architectures", None))
        model = klass.from_pretrained(path, dtype=torch_dtype)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent if path.is_file() else path, **kwargs)
    except Exception:
        tokenizer = None  # a model without a tokenizer (or one transformers cannot read) is merged all the same
    return model, tokenizer


def adapter_names(folders: list[Path]) -> list[str]:
    """One distinct adapter name per folder, from the folder names."""
    names: list[str] = []
    for folder in folders:
        stem = folder.resolve().name.replace(".", "_") or "adapter"
        name, n = stem, 2
        while name in names:
            name, n = f"{stem}_{n}", n + 1
        names.append(name)
    return names


def _weight_files(out: Path) -> list[str]:
    """The weights files of a model saved in ``out`` before: the new save replaces them all, whatever their names."""
    if not out.is_dir():
        return []
    patterns = (
        "model*.safetensors",
        "model.safetensors.index.json",
        "pytorch_model*.bin",
        "pytorch_model.bin.index.json",
    )
    return sorted({p.name for pattern in patterns for p in out.glob(pattern)})


def run(args: argparse.Namespace) -> int:

    out = Path(args.out).expanduser()
    if out.is_file():
        raise CommandError(f"--out {args.out} is a file, not a folder")
    if out.is_dir() and any(not is_bookkeeping(p.name) for p in out.iterdir()) and not args.force:
        raise CommandError(f"--out {args.out} is not empty; choose another folder or pass --force")
    folders = [adapter_folder(p) for p in args.adapter]
    configs = [load_config(f) for f in folders]  # an unknown method fails here, before loading
    names = adapter_names(folders)
    methods = sorted({c.peft_type for c in configs})
    model, tokenizer = load_base(args.base, configs[0].task_type, args.dtype)

    mixed = len(methods) > 1
    # the config is passed so that a mixed model loads this folder's root adapter only, under our name
    peft = PeftModel.from_pretrained(model, folders[0], adapter_name=names[0], config=configs[0], mixed=mixed)
    for folder, name in zip(folders[1:], names[1:]):
        peft.load_adapter(folder, adapter_name=name)
    peft.set_adapter(names)
    layers = list(peft.base_model.adapted_layers())
    for path, layer in tqdm(layers, desc="merging", unit="layer", disable=not layers):
        layer.merge(names, safe=True, layer_name=path)
    merged: Any = peft.merge_and_unload(adapter_names=names)  # every layer is merged already: this unwraps them

    # staged inside --out and committed at once: a crash leaves the previous folder (or none), never a mix
    with save_transaction(out, remove=_weight_files(out)) as staging:
        merged.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and not is_bookkeeping(p.name))
    kind = "mixed " if mixed else ""
    print(
        f"merged {len(names)} {kind}adapter(s) ({', '.join(methods)}: {', '.join(names)}) into {len(layers)} layers "
        f"of {args.base}; wrote {out} ({human_size(size)}"
        + (", with the tokenizer)" if tokenizer is not None else ", no tokenizer found)")
    )
    return 0
