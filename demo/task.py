"""The demo task: a sentence in, a fixed JSON record out, scored by exact match."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

INSTRUCTION = "Turn the calendar request into a JSON record with the keys event, with, day, time."


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of ``{"text": ..., "record": {...}}``, one JSON object a line."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or "text" not in row or "record" not in row:
                raise ValueError(f"{path}:{number}: expected an object with 'text' and 'record'")
            rows.append(row)
    return rows


def target_text(record: dict[str, Any]) -> str:
    """The exact answer the model is trained to give: compact JSON, keys in the record's order."""
    return json.dumps(record, separators=(",", ":"))


def parse_answer(text: str) -> Any:
    """The first JSON object in a model's answer (code fences and chatter around it are ignored); None if none."""
    match = re.search(r"\{.*?\}", text, flags=re.DOTALL)
    if match is None:
        return None
    try:
        return json.loads(match.group(0))
    except json.JSONDecodeError:
        return None


def exact_match(answer: str, record: dict[str, Any]) -> bool:
    """Whether the answer holds a JSON object equal to the record: same keys, same values."""
    return parse_answer(answer) == record


def score(answers: list[str], records: list[dict[str, Any]]) -> float:
    """Exact match in percent."""
    if len(answers) != len(records):
        raise ValueError(f"{len(answers)} answers for {len(records)} records")
    if not records:
        return 0.0
    return 100.0 * sum(exact_match(a, r) for a, r in zip(answers, records)) / len(records)
