"""Hot-swapping LoRA adapters into a compiled model: swap time, recompiles, and the outputs after each swap.

Usage: python benchmarks/hotswap.py [--preset 1b|tiny] [--libs grafting,peft] [--json out.jsonl]

For each library: the base of ``bound.py``'s preset gets a LoRA adapter (r 8 on all seven
projections), is prepared for hot-swapping to rank ``--target-rank`` and compiled; then adapters of
ranks 4, 8, 16 and alphas 8..64 saved beforehand are swapped in one after another, in inference
and in a training step. Each swap is timed (median of the swaps, wall clock around the call,
synchronised), the compiled model's frames and recompiles are counted by dynamo's counters, and
the logits after each swap are compared with the same adapter loaded afresh into an uncompiled
copy (max absolute difference, against the logits' own magnitude and against the difference the
compiler alone makes before any swap).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bound import PRESETS, TARGETS, build_base, libraries

SWAPS = [(4, 8), (16, 64), (8, 32), (16, 16)]  # (rank, alpha) of each adapter swapped in


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _save_adapters(lib: Any, base: torch.nn.Module, folder: Path) -> list[Path]:
    """The first adapter (r 8) and one per swap, each with random B so that every swap changes the output."""
    paths = []
    for k, (r, alpha) in enumerate([(8, 16), *SWAPS]):
        torch.manual_seed(100 + k)
        cfg = lib.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False)
        model = lib.get_peft_model(copy.deepcopy(base), cfg)
        path = folder / f"adapter{k}"
        model.save_pretrained(path)
        paths.append(path)
    return paths


def _frames() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["recompiles"].values())


def _infer_and_train(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """One no-grad forward and one training step (adapter weights get gradients) through ``model``."""
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    model.eval()


def run(
    lib_name: str, libs: dict[str, Any], base: torch.nn.Module, ids: torch.Tensor, args: argparse.Namespace
) -> dict:
    lib = libs[lib_name]
    hotswap = __import__(f"{lib_name}.utils.hotswap", fromlist=["x"]) if lib_name == "peft" else lib
    torch._dynamo.reset()
    with tempfile.TemporaryDirectory() as tmp:
        paths = _save_adapters(lib, base, Path(tmp))
        model = lib.PeftModel.from_pretrained(copy.deepcopy(base), paths[0], is_trainable=True)
        hotswap.prepare_model_for_compiled_hotswap(model, target_rank=args.target_rank)
        compiled = torch.compile(model)
        start = time.perf_counter()
        _infer_and_train(compiled, ids)  # both graphs (inference and training) compiled before the swaps
        _sync(args.device)
        compile_s = time.perf_counter() - start
        graphs0, recompiles0 = _frames()
        with torch.no_grad():  # compiled against eager before any swap: the compiler's own rounding
            first = compiled(input_ids=ids).logits.float()
            eager = lib.PeftModel.from_pretrained(copy.deepcopy(base), paths[0])(input_ids=ids).logits.float()
        baseline = (first - eager).abs().max().item()
        del eager
        swap_ms, errors, scales = [], [], []
        for path in paths[1:]:
            _sync(args.device)
            start = time.perf_counter()
            hotswap.hotswap_adapter(compiled, str(path), adapter_name="default", torch_device=args.device)
            _sync(args.device)
            swap_ms.append(1000 * (time.perf_counter() - start))
            with torch.no_grad():
                swapped = compiled(input_ids=ids).logits.float()
                fresh = lib.PeftModel.from_pretrained(copy.deepcopy(base), path)
                expected = fresh(input_ids=ids).logits.float()
            del fresh
            errors.append((swapped - expected).abs().max().item())
            scales.append(expected.abs().max().item())
            _infer_and_train(compiled, ids)
        _sync(args.device)
        graphs1, recompiles1 = _frames()
    return {
        "lib": lib_name,
        "compile_s": round(compile_s, 1),
        "swap_ms_median": round(statistics.median(swap_ms), 1),
        "swap_ms": [round(t, 1) for t in swap_ms],
        "graphs_before_swaps": graphs0,
        "new_graphs_during_swaps": graphs1 - graphs0,
        "recompiles_during_swaps": recompiles1 - recompiles0,
        "max_abs_logit_diff_vs_fresh_load": max(errors),
        "max_abs_logit_diff_compiled_vs_eager_before_swaps": baseline,
        "max_abs_logit": max(scales),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="1b", choices=["1b", "tiny"])
    parser.add_argument("--libs", default="grafting,peft")
    parser.add_argument("--target-rank", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="append each result as one JSON line here")
    args = parser.parse_args(argv)
    shape = PRESETS[args.preset]
    libs = libraries()
    base = build_base(shape, args.device)
    ids = torch.randint(0, 1000, (min(shape["batch"], 2), shape["seq"]), device=args.device)
    for lib_name in args.libs.split(","):
        result = {"preset": args.preset, "device": str(args.device), **run(lib_name, libs, base, ids, args)}
        print(json.dumps(result), flush=True)
        if args.json:
            with open(args.json, "a") as out:
                out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
