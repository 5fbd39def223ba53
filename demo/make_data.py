"""Write the demo's task data: calendar requests in plain English, each with its fixed JSON record.

The record has four keys in a fixed order: ``event`` (call, meeting, lunch, interview, review),
``with`` (a first name), ``day`` (three-letter lower-case weekday) and ``time`` (24-hour ``HH:MM``).
The sentences vary the wording, the order of the parts, the weekday's spelling (``Tuesday``,
``tuesday``, ``Tue``) and the clock (``3 pm``, ``3:30pm``, ``noon``, ``15:30``), so a model must
normalize, not copy. Run ``python demo/make_data.py`` to rewrite ``demo/data/`` from the seed.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DATA = Path(__file__).parent / "data"
SEED = 2024

EVENTS = {
    "call": ["call", "phone call", "quick call"],
    "meeting": ["meeting", "meeting", "sync meeting"],
    "lunch": ["lunch", "lunch", "team lunch"],
    "interview": ["interview", "job interview"],
    "review": ["review", "code review", "design review"],
}
NAMES = (  # noqa: SIM905
    "Anna Ben Carla David Emma Felix Grace Hugo Ines Jonas Kate Liam Mia Noah Olga Paul Rosa Sam Tara "
    "Umar Vera Will Xena Yuri Zoe Alice Bruno Chloe Diego Elena Farid Greta Hannah Igor Julia Kenji Lena "
    "Marco Nina Omar Priya Quinn Ravi Sofia Tom Ulla Victor Wendy Yara Zack"
).split()
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TEMPLATES = [
    "Set up {a_event} with {name} on {day} at {time}.",
    "Can you book {a_event} with {name} for {day} at {time}?",
    "{name} wants {a_event} on {day}, {time}.",
    "Please schedule {day} {time}: {event} with {name}.",
    "Put {a_event} with {name} in my calendar for {time} on {day}.",
    "{day} at {time} works for {a_event} with {name}.",
    "Remind me about the {event} with {name}, {day} {time}.",
    "I need {a_event} with {name} at {time} on {day}.",
    "Add {a_event} with {name}: {day}, {time}.",
    "Let's do the {event} with {name} {day} at {time}.",
]


def spoken_time(hour: int, minute: int, rng: random.Random) -> str:
    """How a person might write 24-hour ``hour:minute``: ``3 pm``, ``3:30pm``, ``noon`` or ``15:30``."""
    if hour == 12 and minute == 0 and rng.random() < 0.3:
        return "noon"
    if rng.random() < 0.15:
        return f"{hour}:{minute:02d}"
    suffix = "am" if hour < 12 else "pm"
    h12 = hour % 12 or 12
    clock = f"{h12}" if minute == 0 else f"{h12}:{minute:02d}"
    return clock + rng.choice([" ", ""]) + suffix


def spoken_day(day: str, rng: random.Random) -> str:
    return rng.choice([day, day, day.lower(), day[:3]])


def example(rng: random.Random) -> dict[str, object]:
    """One sentence and its record."""
    event = rng.choice(list(EVENTS))
    phrase = rng.choice(EVENTS[event])
    name = rng.choice(NAMES)
    day = rng.choice(DAYS)
    hour = rng.randint(8, 18)
    minute = rng.choice([0, 0, 0, 15, 30, 45])
    text = rng.choice(TEMPLATES).format(
        a_event=("an " if phrase[0] in "aeiou" else "a ") + phrase,
        event=phrase,
        name=name,
        day=spoken_day(day, rng),
        time=spoken_time(hour, minute, rng),
    )
    text = text[0].upper() + text[1:]
    record = {"event": event, "with": name, "day": day[:3].lower(), "time": f"{hour:02d}:{minute:02d}"}
    return {"text": text, "record": record}


def make_splits(seed: int = SEED, n_train: int = 400, n_test: int = 100) -> tuple[list[dict], list[dict]]:
    """Distinct sentences, split into training and held-out examples."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < n_train + n_test:
        row = example(rng)
        if row["text"] not in seen:
            seen.add(str(row["text"]))
            rows.append(row)
    return rows[:n_train], rows[n_train:]


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--train", type=int, default=400, help="training examples")
    parser.add_argument("--test", type=int, default=100, help="held-out examples")
    parser.add_argument("--out", type=Path, default=DATA)
    args = parser.parse_args(argv)
    train, test = make_splits(args.seed, args.train, args.test)
    write_jsonl(train, args.out / "train.jsonl")
    write_jsonl(test, args.out / "test.jsonl")
    print(f"wrote {len(train)} training and {len(test)} held-out examples to {args.out}")


if __name__ == "__main__":
    main()
