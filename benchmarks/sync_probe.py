"""Where a training step makes the host wait for the GPU: each synchronizing CUDA call, with its Python stack.

Usage: python benchmarks/sync_probe.py [--preset moe] [--methods lora-moe] [--layers 2]

A step that synchronises leaves the device idle while the host launches the kernels after the sync, so
host time that would overlap the device's work is exposed (the MoE row's step waited 66 ms on the host).
For the frozen base's step (the bound) and each variant's (grafting beside PEFT), one warm step runs under
``torch.cuda.set_sync_debug_mode("warn")``; each distinct place that synchronised is printed once, with
its count and the innermost frames of its stack. GPU only.
"""

from __future__ import annotations

import argparse
import copy
import traceback
import warnings
from collections import Counter
from typing import Any

import torch
from bound import PRESETS, VOCAB, build_base, embeds_need_grad, libraries, train_step, wrap


def sync_places(step: Any, frames: int = 6) -> Counter[str]:
    """Each synchronizing call of one ``step()``: the innermost ``frames`` frames of its Python stack, counted."""
    found: Counter[str] = Counter()
    shown = warnings.showwarning

    def keep(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if "synchroniz" not in str(message):
            shown(message, category, filename, lineno, file, line)
            return
        stack = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        found["".join(traceback.format_list(stack[-frames:]))] += 1

    with warnings.catch_warnings():  # restores showwarning after
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")  # its own warning (about the mode) is shown, not counted
        warnings.showwarning = keep
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return found


def report(label: str, found: Counter[str]) -> None:
    print(f"=== {label}: {sum(found.values())} synchronizing calls at {len(found)} places", flush=True)
    for stack, count in found.most_common():
        print(f"--- {count}x\n{stack}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="moe", choices=sorted(PRESETS))
    parser.add_argument("--methods", default="lora-moe")
    parser.add_argument("--libs", default="grafting,peft")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (fewer than the preset's: a probe)")
    parser.add_argument("--r", type=int, default=16)
    args = parser.parse_args()
    shape = {**PRESETS[args.preset], "layers": args.layers}
    base = build_base(shape, "cuda", moe=args.preset.startswith("moe"))
    ids = torch.randint(0, VOCAB, (shape["batch"], shape["seq"]), device="cuda")
    libs = libraries()
    bound_model = copy.deepcopy(base)
    embeds_need_grad(bound_model)
    bound_step = train_step(bound_model.train(), ids, [])
    bound_step()
    report("bound", sync_places(bound_step))
    del bound_model, bound_step
    for method in args.methods.split(","):
        for lib in args.libs.split(","):
            model = wrap(lib, libs, base, method, args.r).train()
            step = train_step(model, ids, [p for p in model.parameters() if p.requires_grad])
            step()
            report(f"{method} {lib}", sync_places(step))
            del model, step
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
