"""What the demo shows: the loss curve as a PNG, before/after examples, folder sizes."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from demo.task import exact_match, target_text


def plot_losses(losses: list[float], path: Path, title: str) -> None:
    """Training loss per step, with a moving average, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = max(1, len(losses) // 20)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(range(1, len(losses) + 1), losses, color="#9ecae1", linewidth=1, label="loss per step")
    ax.plot(range(1, len(losses) + 1), smooth, color="#08519c", linewidth=2, label=f"moving average ({window} steps)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy on the answer tokens")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def examples_table(rows: list[dict[str, Any]], before: list[str], after: list[str], count: int) -> str:
    """A few held-out sentences with the base model's and the tuned model's answers, marked right or wrong."""
    picked = [i for i in range(len(rows)) if not exact_match(before[i], rows[i]["record"])][:count]
    picked += [i for i in range(len(rows)) if i not in picked][: count - len(picked)]
    lines = []
    for i in picked:
        record = rows[i]["record"]
        lines.append(f"  sentence: {rows[i]['text']}")
        lines.append(f"  expected: {target_text(record)}")
        for label, answer in (("before", before[i]), ("after", after[i])):
            mark = "ok " if exact_match(answer, record) else "no "
            shown = textwrap.shorten(" ".join(answer.split()), width=100, placeholder=" …") or "(empty)"
            lines.append(f"  {label:>8}: [{mark}] {shown}")
        lines.append("")
    return "\n".join(lines)


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def plot_mixed(losses: list[float], table: dict[str, dict[str, float]], path: Path, title: str) -> None:
    """Demo 2's figure: the mixed batches' training loss, and each task's exact match at each stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    window = max(1, len(losses) // 20)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(losses))
    ]
    steps = range(1, len(losses) + 1)
    left.plot(steps, losses, color="#9ecae1", linewidth=1, label="loss per mixed batch")
    left.plot(steps, smooth, color="#08519c", linewidth=2, label=f"moving average ({window} steps)")
    left.set_yscale("log")
    left.set_xlabel("step")
    left.set_ylabel("cross-entropy on the answer tokens")
    left.set_title("training, every sample routed to its task's adapter")
    left.grid(True, which="both", alpha=0.3)
    left.legend()
    stages = list(table)
    names = list(next(iter(table.values())))
    width = 0.8 / len(stages)
    colors = ["#bdbdbd", "#08519c", "#6baed6", "#31a354", "#fd8d3c", "#756bb1"]
    for k, stage in enumerate(stages):
        xs = [i + (k - (len(stages) - 1) / 2) * width for i in range(len(names))]
        bars = right.bar(xs, [table[stage][n] for n in names], width, label=stage, color=colors[k % len(colors)])
        right.bar_label(bars, fmt="%.0f", fontsize=7)
    right.set_xticks(range(len(names)), names)
    right.set_ylim(0, 110)
    right.set_ylabel("exact match on the held-out set (%)")
    right.set_title("accuracy per task")
    right.legend(fontsize=7, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
