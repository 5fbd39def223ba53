"""A seeded fuzzer of adapter folders: every load is identical, legitimately different, or a grafting error.

Valid folders (LoRA with trained base biases, IA3, prompt tuning) are mutated — safetensors headers
(dtypes, shapes, offsets, keys, bytes), tensor data, the file's length, adapter_config.json (values
of every type, raw bytes, nesting), the weights format, the adapter name — and loaded onto a fresh
base model. A load that fails must raise a :class:`grafting.GraftingError` and leave the base model
bit for bit as it was; a load that succeeds must hold only finite floating-point tensors. The case
count is ``GRAFTING_FUZZ_CASES`` (200 by default); the outcome counts are printed.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import random
import shutil
import struct
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import grafting
from grafting.errors import GraftingError
from grafting.testing import tiny_llama
from tests.helpers import inputs

CASES = int(os.environ.get("GRAFTING_FUZZ_CASES", "200"))
SEED = int(os.environ.get("GRAFTING_FUZZ_SEED", "11"))
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "C64", "XX"]
HOSTILE_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 3, 2**31, 2**62, 2**64, 1e308, -1e308, 0.5, 3.5, -0.0,
    float("inf"), float("-inf"), float("nan"), "", "x", "false", "true", "(", "[a-", ".*", "q_proj",
    [], {}, [[[]]], {"a": 1}, {"(": 2}, {"q_proj": 2**62}, ["q_proj", 3], "all-linear", "lora_only", "all",
]  # fmt: skip
HOSTILE_NAMES = ["", "__base__", "..", "a/b", "/tmp/x", "a\x00b", "a\nb", "x" * 300, "é" * 120, "ok_name", "a.b"]


@functools.cache
def _base(kind: str) -> torch.nn.Module:
    model = tiny_llama()
    if kind == "bias":  # attention biases, so bias="all" saves base tensors
        model.config.attention_bias = True
        from transformers import LlamaForCausalLM

        torch.manual_seed(1)
        model = LlamaForCausalLM(model.config).eval()
    return model


VARIANTS: dict[str, tuple[str, Callable[[], Any]]] = {
    "lora_bias": (
        "bias",
        lambda: grafting.LoraConfig(
            r=2, target_modules=["q_proj", "v_proj"], bias="all", init_lora_weights=False, task_type="CAUSAL_LM"
        ),
    ),
    "ia3": (
        "plain",
        lambda: grafting.IA3Config(
            target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM"
        ),
    ),
    "prompt": ("plain", lambda: grafting.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")),
}


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs("llama")).logits


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, bytes], torch.Tensor]]:
    """Each variant's saved files (bytes) and the logits it loads to."""
    out = {}
    for name, (kind, config) in VARIANTS.items():
        model = grafting.get_peft_model(copy.deepcopy(_base(kind)), config())
        gen = torch.Generator().manual_seed(len(name))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.3)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        files = {n: (folder / n).read_bytes() for n in (CONFIG, WEIGHTS)}
        loaded = grafting.PeftModel.from_pretrained(copy.deepcopy(_base(kind)), folder)
        out[name] = (files, _logits(loaded))
    return out


# -- mutations ---------------------------------------------------------------------------------------------
def _split(raw: bytes) -> tuple[dict[str, Any], bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header: dict[str, Any], data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def mutate_header(rng: random.Random, raw: bytes, strip_digest: bool) -> bytes:
    header, data = _split(raw)
    keys = [k for k in header if k != "__metadata__"]
    key = rng.choice(keys)
    entry = header[key]
    what = rng.choice(["dtype", "shape", "offsets", "drop", "rename", "add", "metadata", "bytes"])
    if what == "dtype":
        entry["dtype"] = rng.choice(DTYPES)
    elif what == "shape":
        entry["shape"] = rng.choice([[], [0], [2**40], [1, 2**62], [-1], list(reversed(entry["shape"]))])
        if rng.random() < 0.5 and entry["shape"] and isinstance(entry["shape"][0], int):
            entry["shape"] = [rng.randint(0, 40) for _ in entry["shape"]]
    elif what == "offsets":
        start, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[end, start], [start, end + 4], [0, len(data) + 8], [start, start]])
    elif what == "drop":
        del header[key]
    elif what == "rename":
        header[key.replace(rng.choice(["lora_A", "ia3_l", "bias", "prompt", "base_model"]), "zz")] = header.pop(key)
    elif what == "add":
        header[key + "x"] = dict(entry)
    elif what == "metadata":
        header["__metadata__"] = rng.choice([{"format": 1}, [], {"format": "pt", "grafting_config_sha256": "0"}])
    if strip_digest and isinstance(header.get("__metadata__"), dict):
        header["__metadata__"].pop("grafting_config_sha256", None)
    out = bytearray(_join(header, data))
    if what == "bytes":
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(8, 8 + struct.unpack("<Q", raw[:8])[0])
            out[i] = rng.randrange(256)
    return bytes(out)


def mutate_data(rng: random.Random, raw: bytes, strip_digest: bool) -> bytes:
    header, data = _split(raw)
    if strip_digest:
        header.get("__metadata__", {}).pop("grafting_config_sha256", None)
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    return _join(header, bytes(buf))


def mutate_length(rng: random.Random, raw: bytes) -> bytes:
    if rng.random() < 0.5:
        return raw[: rng.randrange(len(raw))]
    return raw + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))


def mutate_config(rng: random.Random, raw: bytes) -> bytes:
    what = rng.choice(["value", "value", "value", "drop", "unknown", "bytes", "nest", "non-utf8", "type"])
    data = json.loads(raw)
    if what == "value":
        key = rng.choice(sorted(data))
        data[key] = rng.choice(HOSTILE_VALUES)
    elif what == "drop":
        data.pop(rng.choice(sorted(data)))
    elif what == "unknown":
        data["zz_new_option"] = rng.choice(HOSTILE_VALUES)
    elif what == "type":
        data["peft_type"] = rng.choice(["LORA", "IA3", "LOHA", "PREFIX_TUNING", "NOPE", 3, None])
    elif what == "nest":
        depth = rng.choice([30, 40, 5000])
        return raw[:-2] + b', "deep": ' + b"[" * depth + b"]" * depth + b"}"
    elif what == "non-utf8":
        return raw[:10] + b"\xff\xfe\x80" + raw[10:]
    text = bytearray(json.dumps(data, allow_nan=True).encode())
    if what == "bytes":
        for _ in range(rng.randint(1, 3)):
            text[rng.randrange(len(text))] = rng.randrange(32, 127)
    return bytes(text)


# -- the oracle ----------------------------------------------------------------------------------------------
def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def run_case(
    rng: random.Random, folder: Path, originals: dict[str, tuple[dict[str, bytes], torch.Tensor]]
) -> tuple[str, str]:
    """Mutate one variant's folder, load it, and classify the outcome (or fail the test)."""
    variant = rng.choice(sorted(VARIANTS))
    files, reference = originals[variant]
    weights, config = files[WEIGHTS], files[CONFIG]
    strip = rng.random() < 0.5  # half the cases look like PEFT's files: no config digest to fall back on
    name = "default"
    kind = rng.choice(["header", "header", "data", "length", "config", "config", "config", "name", "bin"])
    if kind == "header":
        weights = mutate_header(rng, weights, strip)
    elif kind == "data":
        weights = mutate_data(rng, weights, strip)
    elif kind == "length":
        weights = mutate_length(rng, weights)
    elif kind == "config":
        config = mutate_config(rng, config)
        if strip:
            weights = _strip(weights)
    elif kind == "name":
        name = rng.choice(HOSTILE_NAMES)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / CONFIG).write_bytes(config)
    if kind == "bin":
        payload = rng.choice([[1], {"a": 1}, {"k": torch.zeros(2, dtype=torch.int64)}, torch.zeros(1), "x"])
        torch.save(payload, folder / "adapter_model.bin")
    else:
        (folder / WEIGHTS).write_bytes(weights)
    base = copy.deepcopy(_base(VARIANTS[variant][0]))
    before = full_state(base)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = grafting.PeftModel.from_pretrained(base, folder, adapter_name=name)
    except GraftingError:
        assert identical(before, full_state(base)), f"{variant}/{kind}: a failed load changed the base model"
        return kind, "grafting error"
    except Exception as exc:  # the finding this test exists for
        pytest.fail(f"{variant}/{kind}: non-grafting {type(exc).__name__}: {str(exc)[:300]}")
    bad = [n for n, t in loaded.state_dict().items() if not t.is_floating_point() or not torch.isfinite(t).all()]
    assert not bad, f"{variant}/{kind}: loaded invalid values into {bad[:3]}"
    out = _logits(loaded)
    if out.shape == reference.shape and torch.equal(out, reference):
        return kind, "identical"
    return kind, "different (valid values)"


def _strip(raw: bytes) -> bytes:
    header, data = _split(raw)
    header.get("__metadata__", {}).pop("grafting_config_sha256", None)
    return _join(header, data)


def test_mutated_adapter_folders_load_identically_differently_or_fail_cleanly(
    originals: dict[str, tuple[dict[str, bytes], torch.Tensor]], tmp_path: Path, record_property: Any
) -> None:
    outcomes: Counter[tuple[str, str]] = Counter()
    for case in range(CASES):
        rng = random.Random(SEED * 1_000_003 + case)
        outcomes[run_case(rng, tmp_path / "case", originals)] += 1
    assert sum(outcomes.values()) == CASES
    assert {o for _, o in outcomes} >= {"grafting error", "identical"}  # the fuzzer reaches both sides
    record_property("fuzz_outcomes", dict(outcomes))
    lines = [f"  {kind:<7} {outcome:<25} {n}" for (kind, outcome), n in sorted(outcomes.items())]
    sys.stdout.write(
        f"\nfuzzed loads: {CASES} cases (seed {SEED}), 0 non-grafting errors, 0 changed base models\n"
        + "\n".join(lines)
        + "\n"
    )
