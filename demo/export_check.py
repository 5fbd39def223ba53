"""Demo 2's adapters exported to plain LoRA (for vLLM) and scored again: what the export costs in accuracy.

Reads the adapters and results ``python -m demo.mixed`` wrote, exports each adapter alone with
``save_as_lora`` at ``--rank`` for ``--for``, loads the export into a fresh base model, scores its task's
held-out examples and prints the accuracy beside the adapter's own (``each adapter alone`` in results.json)
with the export's per-layer errors.

    python -m demo.export_check [--out out/demo-mixed] [--rank 16] [--for vllm]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from demo import make_numbers
from demo import model as models
from demo.finetune import read_rows
from demo.pipeline import answer_ids, generate_answers
from demo.task import INSTRUCTION, score

HERE = Path(__file__).parent
TASKS = {
    "calendar": (INSTRUCTION, "test.jsonl"),
    "numbers": (make_numbers.INSTRUCTION, "numbers_test.jsonl"),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo.export_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE.parent / "out" / "demo-mixed", help="demo.mixed's --out")
    p.add_argument("--model", help="the base model demo.mixed used (default: SmolLM2-135M-Instruct)")
    p.add_argument("--data", type=Path, default=HERE / "data")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--for", dest="serving", choices=["vllm", "sglang"], default="vllm")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    from grafting import PeftModel, save_as_lora

    torch.set_num_threads(args.threads)
    results = json.loads((args.out / "results.json").read_text())
    size = len([a for a in results["answers"] if a["task"] == "calendar"])
    dtype = getattr(torch, results["dtype"])
    folder, _ = models.resolve(args.model)
    found: dict[str, dict[str, float]] = {}
    for name, (instruction, test_file) in TASKS.items():
        rows = read_rows(args.data / test_file)[:size]
        base, tokenizer = models.load(folder, dtype)
        source = PeftModel.from_pretrained(base, args.out / "adapters" / name, adapter_name=name)
        target = args.out / "exported" / name
        exported = save_as_lora(target, source, args.rank, name, serving=args.serving)
        del source, base
        base, _ = models.load(folder, dtype)
        lora = PeftModel.from_pretrained(base, target)
        answers = generate_answers(
            lora,
            tokenizer,
            [r["text"] for r in rows],
            instructions=[instruction] * len(rows),
            max_new_tokens=max(len(answer_ids(tokenizer, r["record"])) for r in rows) + 2,
            batch_size=len(rows),
            progress=not args.quiet,
            desc=f"scoring the exported {name} adapter",
        )
        errors = [layer.relative for layer in exported.layers]
        found[name] = {
            "own": results["exact_match"]["each adapter alone"][name],
            "exported": score(answers, [r["record"] for r in rows]),
            "rank": float(exported.config.r),
            "max_relative_error": max(errors),
            "mean_relative_error": sum(errors) / len(errors),
        }
        print(
            f"{name}: {found[name]['own']:.1f}% -> {found[name]['exported']:.1f}% exported at rank"
            f" {exported.config.r} for {args.serving}; relative error per layer: mean"
            f" {found[name]['mean_relative_error']:.3f}, max {found[name]['max_relative_error']:.3f}"
        )
    (args.out / "export.json").write_text(json.dumps(found, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
