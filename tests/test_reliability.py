"""Hostile names, bad files and failing operations: a grafting error, and the model exactly as it was.

On the toy methods (tests/toy_methods.py); LoRA's fields and biases are plugins/lora/tests/test_lora_reliability.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import grafting
from grafting.errors import AdapterLoadError, ConfigError, GraftingError, MergeError, UnknownMethodError
from grafting.testing import assert_identical
from tests.helpers import base_model, files_under, logits, randomize, toy
from tests.helpers import toy_adapted as adapted

pytestmark = pytest.mark.usefixtures("toy_methods")

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the model (the base's included), by name, copied."""
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=False).items()}


# -- adapter names ---------------------------------------------------------------------------------------
HOSTILE_NAMES = [
    "",
    "__base__",
    ".",
    "..",
    "a.b",
    "/",
    "/tmp/outside",
    "../outside",
    "a/b",
    "a\\b",
    "nul\x00byte",
    "new\nline",
    "tab\there",
    "\x7f",
    "para\u2029graph",
    "é" * 101,  # 202 bytes in UTF-8
    "x" * 201,
    5,
    None,
]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=repr)
def test_a_hostile_adapter_name_is_refused_at_every_entry_point(name: Any, tmp_path: Path) -> None:
    model = adapted("llama")
    model.save_pretrained(tmp_path / "saved")
    before = full_state(model)
    calls = {
        "add_adapter": lambda: model.add_adapter(name, toy("llama")),
        "load_adapter": lambda: model.load_adapter(tmp_path / "saved", adapter_name=name),
        "get_peft_model": lambda: grafting.get_peft_model(base_model("llama"), toy("llama"), adapter_name=name),
        "from_pretrained": lambda: grafting.PeftModel.from_pretrained(
            base_model("llama"), tmp_path / "saved", adapter_name=name
        ),
    }
    for entry, call in calls.items():
        with pytest.raises(ConfigError, match="adapter name"):
            call()
        assert list(model.peft_config) == ["default"], entry
    assert_identical(full_state(model), before, "after refused names")
    assert sorted(os.listdir(tmp_path)) == ["saved"]


def test_a_name_at_the_byte_limit_saves_and_loads(tmp_path: Path) -> None:
    name = "é" * 100  # 200 bytes
    model = adapted("llama")
    model.add_adapter(name, toy("llama", scale=0.2))
    randomize(model, 3)
    model.set_adapter(name)
    out = logits(model, "llama")
    model.save_pretrained(tmp_path)
    loaded = grafting.PeftModel.from_pretrained(base_model("llama"), tmp_path / name, adapter_name=name)
    assert torch.equal(logits(loaded, "llama"), out)


def test_every_saved_file_is_inside_the_folder(tmp_path: Path) -> None:
    model = adapted("llama")
    model.add_adapter("other", toy("llama", scale=0.2))
    model.save_pretrained(tmp_path / "save")
    assert sorted(os.listdir(tmp_path)) == ["save"]
    assert all(not p.startswith("..") for p in files_under(tmp_path / "save"))


# -- loads check before they write ---------------------------------------------------------------------
def test_float_tensors_are_cast_to_the_parameters_dtype(tmp_path: Path) -> None:
    model = adapted("llama")
    randomize(model, 2)
    model.save_pretrained(tmp_path)
    out = logits(model, "llama")
    tensors = load_file(tmp_path / WEIGHTS)
    save_file({k: v.to(torch.float64) for k, v in tensors.items()}, tmp_path / WEIGHTS)
    loaded = grafting.PeftModel.from_pretrained(base_model("llama"), tmp_path)
    assert torch.equal(logits(loaded, "llama"), out)  # float32 -> float64 -> float32 is exact


def test_a_value_too_large_for_the_parameter_dtype_is_refused(tmp_path: Path) -> None:
    model = adapted("llama")
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], 1e39, dtype=torch.float64)
    save_file(tensors, tmp_path / WEIGHTS)
    with pytest.raises(AdapterLoadError, match="too large"):
        grafting.PeftModel.from_pretrained(base_model("llama"), tmp_path)


def test_a_tied_head_that_differs_from_the_embedding_is_refused(tmp_path: Path) -> None:
    model = adapted("gpt2")
    model.save_pretrained(tmp_path, save_embedding_layers=True)
    tensors = load_file(tmp_path / WEIGHTS)
    head = "base_model.model.lm_head.weight"
    assert head in tensors
    tensors[head] = tensors[head] + 1.0
    save_file(tensors, tmp_path / WEIGHTS)
    fresh = base_model("gpt2")
    before = full_state(fresh)
    with pytest.raises(AdapterLoadError, match="tied"):
        grafting.PeftModel.from_pretrained(fresh, tmp_path)
    assert_identical(full_state(fresh), before, "tied embeddings after a refused load")


# -- operations: all or nothing -------------------------------------------------------------------------
def _ia3_with_a_near_zero_entry() -> Any:
    config = grafting.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM"
    )
    model = grafting.get_peft_model(base_model("llama", torch.float64), config)
    with torch.no_grad():
        layers = [p for n, p in model.named_parameters() if n.endswith("ia3_l")]
        for i, p in enumerate(layers):
            p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(i), dtype=p.dtype) + 0.5)
        layers[-1].view(-1)[0] = 1e-30  # the last layer's unmerge will refuse
    model.merge_adapter()
    return model


OPERATIONS = {
    "unmerge_adapter": lambda m: m.unmerge_adapter(),
    "unload": lambda m: m.unload(),
    "delete_adapter": lambda m: m.delete_adapter("default"),
    "disable_adapter": lambda m: m.disable_adapter().__enter__(),
    "set_adapter": lambda m: m.set_adapter("other"),
}


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_a_refused_unmerge_changes_nothing(operation: str) -> None:
    model = _ia3_with_a_near_zero_entry()
    model.add_adapter("other", grafting.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    before, out = full_state(model), logits(model, "llama")
    merged = {p: list(layer.merged) for p, layer in model.base_model.adapted_layers()}
    with pytest.raises(MergeError, match="cannot unmerge"):
        OPERATIONS[operation](model)
    assert_identical(full_state(model), before, f"model after a refused {operation}")
    assert {p: list(layer.merged) for p, layer in model.base_model.adapted_layers()} == merged
    assert list(model.peft_config) == ["default", "other"]
    assert model.active_adapters == ["default"]
    assert torch.equal(logits(model, "llama"), out)


# -- strict config types ---------------------------------------------------------------------------------
#: The core's own fields (every method has them); LoRA's are plugins/lora/tests/test_lora_reliability.py.
BAD_FIELDS = [
    ("inference_mode", "true"),
    ("target_modules", "q_proj("),
    ("exclude_modules", "[a-"),
    ("layers_pattern", ["(unclosed"]),
    ("base_model_name_or_path", ["a"]),
    ("layers_to_transform", [2**70]),
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS, ids=lambda v: repr(v)[:30])
def test_a_bad_config_value_is_a_config_error_naming_the_file_and_field(field: str, value: Any, tmp_path: Path) -> None:
    adapted("llama").save_pretrained(tmp_path)
    data = json.loads((tmp_path / CONFIG).read_text())
    data[field] = value
    if field == "layers_pattern":
        data["layers_to_transform"] = [0]
    (tmp_path / CONFIG).write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=field) as info:
        grafting.PeftModel.from_pretrained(base_model("llama"), tmp_path)
    assert str(tmp_path / CONFIG) in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_virtual_tokens", 2**62), ("num_virtual_tokens", "4"), ("prefix_projection", "false")],
)
def test_prefix_tuning_values_are_checked(field: str, value: Any) -> None:
    kwargs: dict[str, Any] = {"num_virtual_tokens": 4, "task_type": "CAUSAL_LM", field: value}
    with pytest.raises(ConfigError, match=field):
        grafting.PrefixTuningConfig(**kwargs)


def test_ia3_feedforward_regex_and_adaption_prompt_length_are_checked() -> None:
    with pytest.raises(ConfigError, match="feedforward_modules"):
        grafting.IA3Config(target_modules=".*", feedforward_modules="(")
    with pytest.raises(ConfigError, match="adapter_len"):
        grafting.AdaptionPromptConfig(adapter_len=2**62, adapter_layers=1)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b'{"peft_type": "LORA", "r": "\xff\xfe"}', "not UTF-8"),
        (b'{"peft_type": "LORA", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "JSON|nests"),
        (b'{"peft_type": "LORA", "x": ' + b"[" * 40 + b"]" * 40 + b"}", "nests deeper"),
        (b"[1, 2]", "no peft_type"),
        (b'{"peft_type": "LORA", ', "not valid JSON"),
    ],
    ids=["non-utf8", "recursion", "deep", "not-object", "truncated"],
)
def test_a_config_that_is_not_json_of_an_adapter_is_refused(content: bytes, match: str, tmp_path: Path) -> None:
    adapted("llama").save_pretrained(tmp_path)
    (tmp_path / CONFIG).write_bytes(content)
    with pytest.raises(AdapterLoadError, match=match) as info:
        grafting.PeftModel.from_pretrained(base_model("llama"), tmp_path)
    assert CONFIG in str(info.value)


def test_a_huge_config_is_refused_before_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from grafting.config import adapter_config as config_module

    adapted("llama").save_pretrained(tmp_path)
    monkeypatch.setattr(config_module, "MAX_CONFIG_BYTES", 100)
    with pytest.raises(AdapterLoadError, match="larger than"):
        grafting.PeftModel.from_pretrained(base_model("llama"), tmp_path)


def test_an_unknown_peft_type_names_the_file_and_field(tmp_path: Path) -> None:
    adapted("llama").save_pretrained(tmp_path)
    data = json.loads((tmp_path / CONFIG).read_text())
    data["peft_type"] = "NO_SUCH_METHOD"
    (tmp_path / CONFIG).write_text(json.dumps(data))
    with pytest.raises(UnknownMethodError, match="peft_type") as info:
        grafting.PeftModel.from_pretrained(base_model("llama"), tmp_path)
    assert str(tmp_path / CONFIG) in str(info.value)


@pytest.mark.parametrize("payload", [[1, 2], {"a": 1}, {1: torch.zeros(1)}, torch.zeros(2), "text"], ids=repr)
def test_a_bin_file_that_is_not_a_dict_of_tensors_is_refused(payload: Any, tmp_path: Path) -> None:
    adapted("llama").save_pretrained(tmp_path, safe_serialization=False)
    torch.save(payload, tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterLoadError, match=r"adapter_model\.bin"):
        grafting.PeftModel.from_pretrained(base_model("llama"), tmp_path)


def test_inspect_runs_the_same_validation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from grafting.cli import main

    adapted("llama").save_pretrained(tmp_path)
    data = json.loads((tmp_path / CONFIG).read_text())
    data["inference_mode"] = "false"
    (tmp_path / CONFIG).write_text(json.dumps(data))
    assert main(["inspect", str(tmp_path)]) != 0
    assert "inference_mode" in capsys.readouterr().err
    data["inference_mode"] = False
    (tmp_path / CONFIG).write_text(json.dumps(data))
    tensors = load_file(tmp_path / WEIGHTS)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, tmp_path / WEIGHTS)
    assert main(["inspect", str(tmp_path)]) == 1
    assert "int32" in capsys.readouterr().out


def test_every_error_here_is_a_grafting_error() -> None:
    for cls in (AdapterLoadError, ConfigError, MergeError, UnknownMethodError):
        assert issubclass(cls, GraftingError)


def test_weights_beside_the_config_of_another_save_are_refused(tmp_path: Path) -> None:
    adapted("llama", toy("llama", scale=0.1)).save_pretrained(tmp_path / "a")
    adapted("llama", toy("llama", scale=0.2)).save_pretrained(tmp_path / "b")
    data = json.loads((tmp_path / "a" / CONFIG).read_text())
    data["base_model_name_or_path"] = "edited/by-hand"  # descriptive keys may be edited
    (tmp_path / "a" / CONFIG).write_text(json.dumps(data))
    grafting.PeftModel.from_pretrained(base_model("llama"), tmp_path / "a")
    (tmp_path / "a" / CONFIG).write_bytes((tmp_path / "b" / CONFIG).read_bytes())  # same shapes, other scale
    fresh = base_model("llama")
    before = full_state(fresh)
    with pytest.raises(AdapterLoadError, match=r"another adapter_config\.json"):
        grafting.PeftModel.from_pretrained(fresh, tmp_path / "a")
    assert_identical(full_state(fresh), before, "base after a refused pair")


def test_an_interrupted_commit_is_finished_by_the_next_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from grafting.io import transaction

    old = adapted("llama", toy("llama", scale=0.2))
    old.add_adapter("other", toy("llama", scale=0.3))
    old.save_pretrained(tmp_path)
    new = adapted("llama", toy("llama", scale=0.4))
    new.add_adapter("other", toy("llama", scale=0.1))
    randomize(new, 9)
    real = transaction._play_forward
    monkeypatch.setattr(transaction, "_play_forward", lambda root, staging, journal: None)  # killed at the commit point
    new.save_pretrained(tmp_path)
    monkeypatch.setattr(transaction, "_play_forward", real)
    assert (tmp_path / transaction.JOURNAL_NAME).exists()
    loaded = grafting.PeftModel.from_pretrained(base_model("llama"), tmp_path, mixed=True)
    assert loaded.peft_config["default"].scale == 0.4
    assert loaded.peft_config["other"].scale == 0.1
    assert not (tmp_path / transaction.JOURNAL_NAME).exists()
    assert files_under(tmp_path) == sorted(["README.md", CONFIG, WEIGHTS, f"other/{CONFIG}", f"other/{WEIGHTS}"])
    assert sorted(os.listdir(tmp_path)) == sorted(["README.md", CONFIG, WEIGHTS, "other"])


def test_a_saved_head_the_config_does_not_declare_never_reaches_a_tied_embedding(tmp_path: Path) -> None:
    model = adapted("gpt2")
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    head = base_model("gpt2").lm_head.weight.detach().clone()
    tensors["base_model.model.lm_head.weight"] = head + 0.5  # a trained head, but no modules_to_save
    save_file(tensors, tmp_path / WEIGHTS)
    fresh = base_model("gpt2")
    before = full_state(fresh)
    with pytest.raises(AdapterLoadError, match="tied"):
        grafting.PeftModel.from_pretrained(fresh, tmp_path)
    assert_identical(full_state(fresh), before, "tied embeddings after a refused head")
    tensors["base_model.model.lm_head.weight"] = head  # the base's own values: nothing changes, it loads
    save_file(tensors, tmp_path / WEIGHTS)
    grafting.PeftModel.from_pretrained(base_model("gpt2"), tmp_path)
