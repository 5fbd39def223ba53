"""Export adapters as one plain LoRA adapter (by SVD), for PEFT or for a serving stack (vLLM, SGLang)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import attrs

from grafting import PeftModel
from grafting.api.export import LayerExport, save_as_lora
from grafting.cli.common import CommandError, adapter_folder, human_size
from grafting.cli.merge import adapter_names, load_base
from grafting.config.adapter_config import load_config
from grafting.io.transaction import is_bookkeeping


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, metavar="MODEL", help="a transformers model folder or a .gguf file")
    parser.add_argument(
        "--adapter",
        required=True,
        action="append",
        metavar="PATH",
        help="an adapter folder; repeat to stack several (of one method or of several) into one LoRA",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write the LoRA adapter to")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="the rank of every layer")
    size.add_argument(
        "--max-error", type=float, metavar="E", help="per layer, the smallest rank whose relative error is at most E"
    )
    parser.add_argument(
        "--for", dest="serving", choices=["vllm", "sglang"], help="meet what this server loads, or refuse"
    )
    parser.add_argument("--force", action="store_true", help="write into DIR even if it is not empty")
    parser.add_argument("--json", action="store_true", help="print the per-layer errors as JSON")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    if out.is_file():
        raise CommandError(f"--out {args.out} is a file, not a folder")
    if out.is_dir() and any(not is_bookkeeping(p.name) for p in out.iterdir()) and not args.force:
        raise CommandError(f"--out {args.out} is not empty; choose another folder or pass --force")
    folders = [adapter_folder(p) for p in args.adapter]
    configs = [load_config(f) for f in folders]  # an unknown method fails here, before loading
    names = adapter_names(folders)
    model, _ = load_base(args.base, configs[0].task_type, "float32")
    mixed = len({c.peft_type for c in configs}) > 1
    peft = PeftModel.from_pretrained(model, folders[0], adapter_name=names[0], config=configs[0], mixed=mixed)
    for folder, name in zip(folders[1:], names[1:]):
        peft.load_adapter(folder, adapter_name=name)
    exported = save_as_lora(
        out, peft, args.rank, names, max_error=args.max_error, serving=args.serving, progressbar=not args.json
    )
    if args.json:
        print(json.dumps({"out": str(out), "rank": exported.config.r, "layers": [_row(x) for x in exported.layers]}))
        return 0
    print(exported.report())
    ranks = sorted({layer.rank for layer in exported.layers})
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and not is_bookkeeping(p.name))
    target = f" for {args.serving}" if args.serving else ""
    print(
        f"exported {', '.join(names)} ({', '.join(sorted({str(c.peft_type) for c in configs}))}) as one LoRA"
        f"{target}: {len(exported.layers)} layers, rank {'/'.join(map(str, ranks))}, largest relative error"
        f" {exported.max_relative_error:.2e}; wrote {out} ({human_size(size)})"
    )
    return 0


def _row(layer: LayerExport) -> dict[str, object]:
    return attrs.asdict(layer)
