"""Demo 2: two tasks, two adapters of different methods, one model, every batch mixed.

SmolLM2-135M-Instruct learns the calendar task (demo/data/train.jsonl) with a LoRA adapter
and the number task (demo/data/numbers_*.jsonl: a number in words -> its digits) with a LoHa
adapter, both in one training run: every batch mixes the two tasks and each sample is routed
to its task's adapter (``adapter_names=``), so each adapter learns only from its own task.
It then scores both tasks in one mixed batch, routed per sample, against each adapter alone;
saves the mixed model; reloads it into a fresh base and checks the answers are identical;
and, where peft is installed, loads each adapter alone in PEFT and scores it there.

    python -m demo.mixed [--model DIR_OR_GGUF] [--steps 100] [--out out/demo-mixed]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import attrs
import torch

from demo import make_numbers
from demo import model as models
from demo.finetune import Clock, read_rows
from demo.pipeline import answer_ids, encode, generate_answers, train
from demo.report import folder_size, human_size, plot_mixed
from demo.task import INSTRUCTION, score

HERE = Path(__file__).parent
ROOT = HERE.parent


@attrs.frozen
class Task:
    """One task of the demo: its adapter's name and method, its instruction and its data."""

    name: str
    method: str
    instruction: str
    train: list[dict[str, Any]]
    test: list[dict[str, Any]]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m demo.mixed", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a transformers model folder or a .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--data", type=Path, default=HERE / "data", help="folder with both tasks' JSONL files")
    p.add_argument("--calendar-method", default="lora", help="the calendar task's adapter method")
    p.add_argument("--numbers-method", default="loha", help="the number task's adapter method")
    p.add_argument("--rank", type=int, default=8, help="both adapters' rank")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps (each batch mixes the two tasks)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "out" / "demo-mixed", help="where adapters and results go")
    p.add_argument("--cache", type=Path, help="where converted GGUF weights are kept (default ~/.cache/grafting-demo)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (see demo.finetune --help)")
    p.add_argument("--test-size", type=int, default=40, help="held-out examples scored per task (the first N)")
    p.add_argument("--eval-batch-size", type=int, default=40)
    p.add_argument("--no-peft", action="store_true", help="skip loading each adapter alone in PEFT")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if min(args.steps, args.rank, args.batch_size, args.threads, args.eval_batch_size, args.test_size) < 1:
        p.error("--steps, --rank, --batch-size, --test-size, --eval-batch-size and --threads must be at least 1")
    return args


def adapter_config(method_name: str, rank: int) -> Any:
    """A config for ``method_name`` on every linear layer, with ``rank`` and alpha = 2·rank where it has them."""
    from demo.finetune import adapter_config as one_config

    return one_config(method_name, rank, None, None)


def interleave(tasks: list[Task]) -> list[tuple[Task, dict[str, Any]]]:
    """Every task's held-out rows, alternating, so every evaluation batch mixes the tasks."""
    rows: list[tuple[Task, dict[str, Any]]] = []
    for i in range(max(len(t.test) for t in tasks)):
        rows += [(t, t.test[i]) for t in tasks if i < len(t.test)]
    return rows


def per_task(tasks: list[Task], mixed: list[tuple[Task, dict[str, Any]]], answers: list[str]) -> dict[str, list[str]]:
    """Answers of a mixed evaluation, split back by task (in each task's test order)."""
    return {t.name: [a for (task, _), a in zip(mixed, answers) if task is t] for t in tasks}


def run(args: argparse.Namespace) -> int:
    from grafting import PeftModel, get_peft_model

    clock = Clock()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data: Path = args.data
    tasks = [
        Task(
            "calendar",
            args.calendar_method,
            INSTRUCTION,
            read_rows(data / "train.jsonl"),
            read_rows(data / "test.jsonl")[: args.test_size],
        ),
        Task(
            "numbers",
            args.numbers_method,
            make_numbers.INSTRUCTION,
            read_rows(data / "numbers_train.jsonl"),
            read_rows(data / "numbers_test.jsonl")[: args.test_size],
        ),
    ]
    dtype = models.pick_dtype(args.dtype)
    folder, display = models.resolve(args.model, args.cache)
    model, tokenizer = models.load(folder, dtype)
    print(f"model:   {display}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, {str(dtype)[6:]}")
    for t in tasks:
        print(f"task:    {t.name}: {len(t.train)} training, {len(t.test)} held-out examples -> a {t.method} adapter")
    print(f"threads: {torch.get_num_threads()}; model ready in {clock.lap('load'):.1f}s")
    progress = not args.quiet
    mixed_rows = interleave(tasks)
    texts = [row["text"] for _, row in mixed_rows]
    instructions = [t.instruction for t, _ in mixed_rows]
    routes = [t.name for t, _ in mixed_rows]
    max_new = max(len(answer_ids(tokenizer, row["record"])) for _, row in mixed_rows) + 2

    def generate(m: torch.nn.Module, desc: str, names: list[str] | None, rows: list[int] | None = None) -> list[str]:
        picked = range(len(texts)) if rows is None else rows
        return generate_answers(
            m,
            tokenizer,
            [texts[i] for i in picked],
            instructions=[instructions[i] for i in picked],
            adapter_names=None if names is None else [names[i] for i in picked],
            max_new_tokens=max_new,
            batch_size=args.eval_batch_size,
            progress=progress,
            desc=desc,
        )

    def scores(answers: dict[str, list[str]]) -> dict[str, float]:
        return {t.name: score(answers[t.name], [r["record"] for r in t.test]) for t in tasks}

    results: dict[str, Any] = {"model": display, "dtype": str(dtype)[6:], "threads": torch.get_num_threads()}
    before = per_task(tasks, mixed_rows, generate(model, "scoring the base model", None))
    table: dict[str, dict[str, float]] = {"base model": scores(before)}
    print(f"\nbefore:  {_fmt(table['base model'])} exact match ({clock.lap('eval_before'):.0f}s)")

    first, second = tasks
    peft_model = get_peft_model(model, adapter_config(first.method, args.rank), adapter_name=first.name, mixed=True)
    peft_model.add_adapter(second.name, adapter_config(second.method, args.rank))
    peft_model.set_adapter([t.name for t in tasks])  # both active and trainable; adapter_names routes each sample
    trainable, _ = peft_model.get_nb_trainable_parameters()
    print(f"adapters: {', '.join(f'{t.name} ({t.method}, r={args.rank})' for t in tasks)}; {trainable:,} trainable")
    examples, owners = [], []
    for t in tasks:
        examples += encode(tokenizer, t.train, t.instruction)
        owners += [t.name] * len(t.train)
    losses = train(
        peft_model,
        examples,
        pad_id=tokenizer.pad_token_id,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        progress=progress,
        adapter_names=owners,
    )
    print(
        f"trained: {args.steps} mixed batches of {args.batch_size}, each sample routed to its task's adapter,"
        f" in {clock.lap('train'):.0f}s; loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    )

    routed_flat = generate(peft_model, "scoring both tasks in mixed batches", routes)
    routed = per_task(tasks, mixed_rows, routed_flat)
    table["mixed batch, routed per sample"] = scores(routed)
    print(f"routed:  {_fmt(table['mixed batch, routed per sample'])} ({clock.lap('eval_routed'):.0f}s)")
    alone: dict[str, list[str]] = {}
    for t in tasks:
        peft_model.set_adapter(t.name)
        own = [i for i, (task, _) in enumerate(mixed_rows) if task is t]
        alone[t.name] = generate(peft_model, f"scoring {t.name} with its adapter alone", None, own)
    peft_model.set_adapter([t.name for t in tasks])
    table["each adapter alone"] = scores(alone)
    same_alone = {t.name: _same(alone[t.name], routed[t.name]) for t in tasks}
    print(
        f"alone:   {_fmt(table['each adapter alone'])}; the same answers as routed: "
        f"{', '.join(f'{k} {v}/{len(alone[k])}' for k, v in same_alone.items())} ({clock.lap('eval_alone'):.0f}s)"
    )

    out: Path = args.out
    adapters_dir = out / "adapters"
    peft_model.save_pretrained(adapters_dir)
    print(f"saved:   {adapters_dir} ({human_size(folder_size(adapters_dir))}: one PEFT folder per adapter)")
    del peft_model, model

    fresh, _ = models.load(folder, dtype)
    reloaded = PeftModel.from_pretrained(fresh, adapters_dir, mixed=True)
    again_flat = generate(reloaded, "scoring the reloaded mixed model", routes)
    table["reloaded mixed model, routed"] = scores(per_task(tasks, mixed_rows, again_flat))
    identical = again_flat == routed_flat
    print(
        f"reload:  {_fmt(table['reloaded mixed model, routed'])}; "
        f"{'the same answers as before saving' if identical else 'ANSWERS DIFFER from the in-memory model'}"
        f" ({clock.lap('reload'):.0f}s)"
    )
    del reloaded, fresh
    peft_check: dict[str, dict[str, float]] = {}
    if not args.no_peft and _peft_available():
        peft_check = compare_with_peft(folder, dtype, adapters_dir, tasks, tokenizer)
        print(
            "peft:    each adapter loaded alone in PEFT and in grafting, teacher-forced on 8 held-out answers: "
            + "; ".join(
                f"{k}: max |Δlogit| {v['max_abs_logit_diff']:.1e}, same greedy tokens "
                f"{v['same_tokens']:.0f}/{v['tokens']:.0f}"
                for k, v in peft_check.items()
            )
            + f" ({clock.lap('peft'):.0f}s)"
        )

    print("\n" + markdown_table(table, tasks))
    plot = out / "mixed.png"
    plot_mixed(losses, table, plot, f"{display.split(' ')[0]}: {' + '.join(f'{t.method}' for t in tasks)}")
    results.update(
        {
            "adapters": {t.name: {"method": t.method, "rank": args.rank} for t in tasks},
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "trainable_parameters": trainable,
            "exact_match": table,
            "same_answers_alone_vs_routed": same_alone,
            "peft_alone_vs_grafting_alone": peft_check,
            "reloaded_answers_identical": identical,
            "losses": losses,
            "seconds": {**{k: round(v, 1) for k, v in clock.phases.items()}, "total": round(clock.total, 1)},
            "answers": [
                {"task": t.name, "text": row["text"], "before": b, "after": a}
                for (t, row), b, a in zip(mixed_rows, _flat(tasks, mixed_rows, before), routed_flat)
            ],
        }
    )
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"plot:    {plot}\nresults: {out / 'results.json'}")
    print(
        f"\ntime:    {clock.total / 60:.1f} min in all ({', '.join(f'{k} {v:.0f}s' for k, v in clock.phases.items())})"
    )
    return 0 if identical else 1


@torch.no_grad()
def compare_with_peft(
    folder: Path, dtype: torch.dtype, adapters_dir: Path, tasks: list[Task], tokenizer: Any
) -> dict[str, dict[str, float]]:
    """Each saved adapter loaded alone by grafting and by PEFT into fresh base models: their logits on
    eight held-out prompts followed by their answers (teacher-forced), compared."""
    from peft import PeftModel as PeftReference

    from demo.pipeline import left_pad
    from grafting import PeftModel

    found: dict[str, dict[str, float]] = {}
    for t in tasks:
        batch = encode(tokenizer, t.test[:8], t.instruction)
        ids, mask = left_pad([p + a for p, a in batch], tokenizer.pad_token_id)
        logits = []
        for loader in (PeftModel, PeftReference):
            base, _ = models.load(folder, dtype)
            model = loader.from_pretrained(base, adapters_dir / t.name)
            logits.append(model(input_ids=ids, attention_mask=mask).logits.float())
            del model, base
        ours, theirs = logits
        spans = [slice(ids.shape[1] - len(a) - 1, ids.shape[1] - 1) for _, a in batch]
        same = sum(int((ours[i, s].argmax(-1) == theirs[i, s].argmax(-1)).sum()) for i, s in enumerate(spans))
        found[t.name] = {
            "max_abs_logit_diff": float((ours - theirs)[mask.bool()].abs().max()),
            "same_tokens": float(same),
            "tokens": float(sum(len(a) for _, a in batch)),
        }
    return found


def markdown_table(table: dict[str, dict[str, float]], tasks: list[Task]) -> str:
    """Exact match per task (columns) for each stage (rows), as a Markdown table."""
    head = "| | " + " | ".join(f"{t.name} ({t.method})" for t in tasks) + " |"
    lines = [head, "| --- |" + " --- |" * len(tasks)]
    for stage, values in table.items():
        lines.append(f"| {stage} | " + " | ".join(f"{values[t.name]:.0f}%" for t in tasks) + " |")
    return "\n".join(lines)


def _flat(tasks: list[Task], mixed: list[tuple[Task, dict[str, Any]]], answers: dict[str, list[str]]) -> list[str]:
    """Per-task answers back in the mixed order."""
    positions = {t.name: iter(answers[t.name]) for t in tasks}
    return [next(positions[t.name]) for t, _ in mixed]


def _same(a: list[str], b: list[str]) -> int:
    return sum(x == y for x, y in zip(a, b))


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:5.1f}%" for name, value in values.items())


def _peft_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("peft") is not None


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
