"""Write demo 2's second task: a number written in words inside a sentence, answered as digits in JSON.

The record is ``{"number": N}`` with ``1 <= N <= 999``. The sentences vary the wording
("three hundred and forty-two", "three hundred forty two", "Forty-Two"), the surrounding
sentence and the capitalization, so a model must read the words, not copy characters.
Run ``python -m demo.make_numbers`` to rewrite ``demo/data/numbers_*.jsonl`` from the seed.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from demo.make_data import write_jsonl

DATA = Path(__file__).parent / "data"
SEED = 2025
INSTRUCTION = "Write the number in the sentence in digits, as a JSON record with the key number."

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEENS = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
TEMPLATES = [
    "The hall seats {n} people.",
    "We sold {n} tickets yesterday.",
    "My grandmother planted {n} tulips.",
    "The train was {n} minutes late.",
    "There are {n} pages left in the book.",
    "Order {n} boxes of paper, please.",
    "The recipe needs {n} grams of flour.",
    "She ran {n} laps around the track.",
    "The museum owns {n} paintings.",
    "I counted {n} birds on the wire.",
]


def below_hundred(n: int, rng: random.Random) -> str:
    if n < 10:
        return ONES[n]
    if n < 20:
        return TEENS[n - 10]
    tens, ones = divmod(n, 10)
    if ones == 0:
        return TENS[tens]
    return TENS[tens] + rng.choice(["-", "-", " "]) + ONES[ones]


def in_words(n: int, rng: random.Random) -> str:
    """``n`` (1..999) in English words, in one of the ways people write it."""
    hundreds, rest = divmod(n, 100)
    if hundreds == 0:
        return below_hundred(rest, rng)
    head = f"{rng.choice(['one', 'a']) if hundreds == 1 else ONES[hundreds]} hundred"
    if rest == 0:
        return head
    return head + rng.choice([" and ", " and ", " "]) + below_hundred(rest, rng)


def example(rng: random.Random) -> dict[str, object]:
    """One sentence and its record."""
    n = rng.choice([rng.randint(1, 99), rng.randint(100, 999), rng.randint(100, 999)])
    words = in_words(n, rng)
    if rng.random() < 0.2:
        words = words.title()
    text = rng.choice(TEMPLATES).format(n=words)
    return {"text": text[0].upper() + text[1:], "record": {"number": n}}


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--train", type=int, default=400, help="training examples")
    parser.add_argument("--test", type=int, default=100, help="held-out examples")
    parser.add_argument("--out", type=Path, default=DATA)
    args = parser.parse_args(argv)
    train, test = make_splits(args.seed, args.train, args.test)
    write_jsonl(train, args.out / "numbers_train.jsonl")
    write_jsonl(test, args.out / "numbers_test.jsonl")
    print(f"wrote {len(train)} training and {len(test)} held-out examples to {args.out}")


if __name__ == "__main__":
    main()
