"""Demo 2 (``nox -s demo-mixed``): its second task's data, and its whole pipeline on a tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from demo import make_data, make_numbers, mixed
from demo.task import INSTRUCTION, read_jsonl, target_text
from grafting.io.transaction import is_bookkeeping
from grafting.testing import tiny_llama
from tests.test_demo_pipeline import char_tokenizer

WORDS = {w: i for i, w in enumerate(make_numbers.ONES)}
WORDS |= {w: 10 + i for i, w in enumerate(make_numbers.TEENS)}
WORDS |= {w: 10 * i for i, w in enumerate(make_numbers.TENS) if i >= 2}


def value_of(words: str) -> int:
    """The number a phrase such as "Three Hundred And Forty-Two" names, read independently of the generator."""
    total = 0
    for word in re.split(r"[\s-]+", words.lower()):
        if word == "hundred":
            total *= 100
        elif word == "a":
            total += 1
        elif word != "and":
            total += WORDS[word]
    return total


def test_shipped_number_data_is_what_the_generator_makes() -> None:
    train, test = make_numbers.make_splits()
    assert read_jsonl(make_numbers.DATA / "numbers_train.jsonl") == train
    assert read_jsonl(make_numbers.DATA / "numbers_test.jsonl") == test
    assert (len(train), len(test)) == (400, 100)
    assert not {r["text"] for r in train} & {r["text"] for r in test}


@given(seed=st.integers(0, 2**32 - 1))
def test_every_number_record_says_what_its_sentence_says(seed: int) -> None:
    train, test = make_numbers.make_splits(seed, n_train=30, n_test=10)
    for row in train + test:
        number = row["record"]["number"]
        assert list(row["record"]) == ["number"]
        assert 1 <= number <= 999
        template = next(t for t in make_numbers.TEMPLATES if re.fullmatch(_pattern(t), row["text"], re.IGNORECASE))
        words = re.fullmatch(_pattern(template), row["text"], re.IGNORECASE).group(1)  # type: ignore[union-attr]
        assert value_of(words) == number, row


def _pattern(template: str) -> str:
    before, after = template.split("{n}")
    return re.escape(before) + "(.+)" + re.escape(after)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a character tokenizer over both tasks' text."""
    rows = [row for split in (*make_data.make_splits(), *make_numbers.make_splits()) for row in split]
    texts = [INSTRUCTION, make_numbers.INSTRUCTION, "\nRequest: \nJSON: "]
    texts += [r["text"] for r in rows] + [target_text(r["record"]) for r in rows]
    tokenizer = char_tokenizer(texts)
    model = tiny_llama(hidden=32, layers=2)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    torch.manual_seed(0)
    torch.nn.init.normal_(model.get_output_embeddings().weight, std=0.5)
    model.config.update({"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id})
    model.config.max_position_embeddings = 256
    folder = tmp_path_factory.mktemp("demo-mixed") / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_demo_mixed_end_to_end_on_a_tiny_model(
    tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both adapters train routed in one run, score in one mixed batch, save as one model, reload identically,
    and each loads alone in PEFT."""
    data = tmp_path / "data"
    train, test = make_data.make_splits(seed=7, n_train=16, n_test=4)
    make_data.write_jsonl(train, data / "train.jsonl")
    make_data.write_jsonl(test, data / "test.jsonl")
    train, test = make_numbers.make_splits(seed=7, n_train=16, n_test=4)
    make_data.write_jsonl(train, data / "numbers_train.jsonl")
    make_data.write_jsonl(test, data / "numbers_test.jsonl")
    out = tmp_path / "out"
    argv = ["--model", str(tiny_folder), "--data", str(data), "--out", str(out), "--cache", str(tmp_path)]
    argv += ["--steps", "12", "--batch-size", "4", "--lr", "1e-2", "--rank", "2", "--dtype", "float32"]
    argv += ["--test-size", "4", "--eval-batch-size", "4", "--quiet", "--threads", str(torch.get_num_threads())]
    status = mixed.main(argv)
    printed = capsys.readouterr().out
    assert status == 0, printed

    results = json.loads((out / "results.json").read_text())
    assert results["reloaded_answers_identical"] is True
    table = results["exact_match"]
    assert table["reloaded mixed model, routed"] == table["mixed batch, routed per sample"]
    assert set(table) == {
        "base model",
        "mixed batch, routed per sample",
        "each adapter alone",
        "reloaded mixed model, routed",
    }
    assert results["adapters"] == {"calendar": {"method": "lora", "rank": 2}, "numbers": {"method": "loha", "rank": 2}}
    assert len(results["losses"]) == 12
    assert sum(results["losses"][-3:]) / 3 < results["losses"][0]  # it learned something
    # routed per sample = each adapter alone: the answers agree, here and once loaded in PEFT
    assert results["same_answers_alone_vs_routed"] == {"calendar": 4, "numbers": 4}
    for check in results["peft_alone_vs_grafting_alone"].values():
        assert check["max_abs_logit_diff"] < 1e-4
        assert check["same_tokens"] == check["tokens"]
    for name, peft_type in (("calendar", "LORA"), ("numbers", "LOHA")):
        saved = out / "adapters" / name
        assert json.loads((saved / "adapter_config.json").read_text())["peft_type"] == peft_type
        files = sorted(p.name for p in saved.iterdir() if not is_bookkeeping(p.name))
        assert files == ["adapter_config.json", "adapter_model.safetensors"]
    assert (out / "mixed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for label in ("before:", "routed:", "alone:", "reload:", "peft:", "the same answers as before saving", "time:"):
        assert label in printed
