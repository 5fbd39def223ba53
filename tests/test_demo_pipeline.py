"""The demo (``nox -s demo``): its data generator, its scoring, and its whole pipeline on a tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from demo import finetune, make_data
from demo.pipeline import answer_ids, answer_loss, encode, left_pad, positions, prompt_ids
from demo.task import INSTRUCTION, exact_match, parse_answer, read_jsonl, score, target_text
from grafting.io.transaction import is_bookkeeping
from grafting.testing import assert_close, tiny_llama

DAYS = {d[:3].lower(): d for d in make_data.DAYS}


def clock_of(text: str) -> str:
    """The 24-hour time a sentence states, read independently of the generator."""
    if re.search(r"\bnoon\b", text):
        return "12:00"
    match = re.search(r"\b(\d{1,2})(?::(\d\d))?\s?(am|pm)\b", text)
    if match:
        hour, minute = int(match.group(1)) % 12, int(match.group(2) or 0)
        return f"{hour + (12 if match.group(3) == 'pm' else 0):02d}:{minute:02d}"
    match = re.search(r"\b(\d{1,2}):(\d\d)\b", text)
    assert match, text
    return f"{int(match.group(1)):02d}:{match.group(2)}"


# -- data -------------------------------------------------------------------------------------------
def test_shipped_data_is_what_the_generator_makes() -> None:
    train, test = make_data.make_splits()
    assert read_jsonl(make_data.DATA / "train.jsonl") == train
    assert read_jsonl(make_data.DATA / "test.jsonl") == test
    assert (len(train), len(test)) == (400, 100)
    assert not {r["text"] for r in train} & {r["text"] for r in test}


@given(seed=st.integers(0, 2**32 - 1))
def test_every_record_says_what_its_sentence_says(seed: int) -> None:
    train, test = make_data.make_splits(seed, n_train=30, n_test=10)
    assert make_data.make_splits(seed, n_train=30, n_test=10) == (train, test)  # the seed decides everything
    for row in train + test:
        text, record = row["text"], row["record"]
        assert list(record) == ["event", "with", "day", "time"]
        assert record["event"] in make_data.EVENTS
        assert any(phrase in text for phrase in make_data.EVENTS[record["event"]])
        assert re.search(rf"\b{record['with']}\b", text)
        full = DAYS[record["day"]]
        assert re.search(rf"\b({full}|{full.lower()}|{full[:3]})\b", text)
        assert record["time"] == clock_of(text)


# -- scoring ----------------------------------------------------------------------------------------
RECORD = {"event": "call", "with": "Anna", "day": "tue", "time": "15:00"}


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (target_text(RECORD), True),
        ('Sure! ```json\n{"event": "call", "with": "Anna", "day": "tue", "time": "15:00"}\n```', True),
        ('{"time":"15:00","day":"tue","with":"Anna","event":"call"}', True),  # same record, other key order
        ('{"event":"call","with":"Anna","day":"tue","time":"3 pm"}', False),
        ('{"event":"call","with":"Anna","day":"tue"}', False),
        ('{"event":"call","with":"Anna","day":"tue","time":"15:00","room":"B"}', False),
        ('{"event": "call", "with": "Anna",', False),
        ("I can't help with that.", False),
        ("", False),
    ],
)
def test_exact_match(answer: str, expected: bool) -> None:
    assert exact_match(answer, RECORD) is expected


def test_score_is_the_percentage_of_exact_matches() -> None:
    other = dict(RECORD, day="wed")
    answers = [target_text(RECORD), target_text(RECORD), "nothing", target_text(RECORD)]
    assert score(answers, [RECORD, other, RECORD, RECORD]) == 50.0
    assert parse_answer("no json here") is None
    with pytest.raises(ValueError, match="3 answers for 2 records"):
        score(["a", "b", "c"], [RECORD, RECORD])


# -- a tiny model with a character-level tokenizer ----------------------------------------------------
def char_tokenizer(texts: list[str]):  # type: ignore[no-untyped-def]
    """A character-level fast tokenizer over the characters of ``texts``, built offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("".join(texts)))
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def all_text(rows: list[dict]) -> list[str]:
    return [INSTRUCTION, "\nRequest: \nJSON: "] + [r["text"] for r in rows] + [target_text(r["record"]) for r in rows]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama and its tokenizer, saved as a transformers folder."""
    train, test = make_data.make_splits()
    tokenizer = char_tokenizer(all_text(train + test))
    model = tiny_llama(hidden=32, layers=2)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    # at the default init a 32-wide model's logits stay near uniform whatever its adapters do: widen them
    torch.manual_seed(0)
    torch.nn.init.normal_(model.get_output_embeddings().weight, std=0.5)
    model.config.update({"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id})
    model.config.max_position_embeddings = 256
    folder = tmp_path_factory.mktemp("demo") / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_prompt_uses_the_chat_template_when_there_is_one(tiny_folder: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    sentence = "Set up a call with Anna on Tuesday at 3 pm."
    plain = tokenizer.decode(prompt_ids(tokenizer, sentence))
    assert plain == f"{INSTRUCTION}\nRequest: {sentence}\nJSON: "
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant: "
    chat = tokenizer.decode(prompt_ids(tokenizer, sentence))
    assert chat == f"system: {INSTRUCTION}\nuser: {sentence}\nassistant: "
    answer = answer_ids(tokenizer, RECORD)
    assert answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer[:-1]) == target_text(RECORD)


def test_left_padding_and_positions() -> None:
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_answer_loss_counts_the_answer_tokens_only(tiny_folder: Path) -> None:
    """The loss equals cross-entropy over each answer's tokens, computed one unpadded sequence at a time."""
    from demo import model as models

    model, tokenizer = models.load(tiny_folder, torch.float32)
    rows = make_data.make_splits(n_train=3, n_test=0)[0]
    batch = encode(tokenizer, rows)
    losses, count = [], 0
    with torch.no_grad():
        got = answer_loss(model, batch, tokenizer.pad_token_id)
        for prompt, answer in batch:
            logits = model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
            losses.append(torch.nn.functional.cross_entropy(logits, torch.tensor(answer), reduction="sum"))
            count += len(answer)
    assert_close(got, torch.stack(losses).sum() / count, msg="padded batch loss")


def test_demo_end_to_end_on_a_tiny_model(tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Score, train, save, reload into a fresh base and score again; every output is written."""
    train, test = make_data.make_splits(seed=7, n_train=24, n_test=6)
    make_data.write_jsonl(train, tmp_path / "train.jsonl")
    make_data.write_jsonl(test, tmp_path / "test.jsonl")
    out = tmp_path / "out"
    argv = [
        "--model",
        str(tiny_folder),
        "--train",
        str(tmp_path / "train.jsonl"),
        "--test",
        str(tmp_path / "test.jsonl"),
    ]
    argv += ["--steps", "30", "--batch-size", "4", "--lr", "1e-2", "--rank", "4", "--out", str(out)]
    argv += ["--dtype", "float32", "--eval-batch-size", "4", "--examples", "2", "--quiet", "--cache", str(tmp_path)]
    argv += ["--threads", str(torch.get_num_threads())]  # leave the test process's setting as it is
    status = finetune.main(argv)
    printed = capsys.readouterr().out
    assert status == 0, printed

    results = json.loads((out / "results.json").read_text())
    assert results["reloaded_answers_identical"] is True
    scores = results["exact_match"]
    assert scores["reloaded"] == scores["after"]
    assert all(0 <= s <= 100 for s in scores.values())
    losses = results["losses"]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0]  # it learned something
    assert results["config"]["r"] == 4
    assert results["config"]["target_modules"] == "all-linear"
    assert len(results["answers"]) == 6

    assert sorted(p.name for p in (out / "adapter").iterdir() if not is_bookkeeping(p.name)) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for label in ("before:", "after:", "reload:", "the same answers as before saving", "sentence:", "time:"):
        assert label in printed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--train", "no/such/file.jsonl"], "data file no/such/file.jsonl does not exist"),
        (["--model", "no/such/model"], "model no/such/model does not exist"),
        (["--method", "no_such_method"], "no installed grafting plugin provides the method"),
    ],
)
def test_demo_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert finetune.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert message in err


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "holds no examples"), ('{"text": "hi"}\n', "1: expected an object with 'text' and 'record'"), ("{", "")],
)
def test_demo_refuses_a_bad_data_file(
    content: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.jsonl").write_text(content)
    assert finetune.main(["--train", str(tmp_path / "bad.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"error: data file {tmp_path / 'bad.jsonl'}")
    assert message in err
