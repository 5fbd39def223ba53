"""Saving and loading: bit-identical round trips, adapter names and folders, atomic writes, load errors.

On the toy methods (tests/toy_methods.py); LoRA's own round trips are plugins/lora/tests/test_lora_io.py.
"""

from __future__ import annotations

import builtins
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import grafting
from grafting.errors import AdapterLoadError, AdapterNotFoundError
from grafting.io import files as grafting_io
from grafting.io.state_dict import get_peft_model_state_dict, set_peft_model_state_dict
from grafting.model.layer import AdaptedLayer
from grafting.testing import assert_close, assert_identical, check_save_load_round_trip
from tests.helpers import (
    ARCHS,
    LINEAR,
    base_logits,
    base_model,
    files_under,
    logits,
    randomize,
    read_json,
    state_of,
    toy,
    toy_configs,
)
from tests.helpers import toy_adapted as adapted

pytestmark = pytest.mark.usefixtures("toy_methods")

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
# tmp_path_factory is session-scoped: hypothesis examples each take a fresh folder from it
EXAMPLES = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _tensors(model: Any, name: str = "default") -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}


# -- round trips ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@EXAMPLES
@given(data=st.data(), safe_serialization=st.booleans())
def test_save_load_round_trip_is_bit_identical(
    arch: str, data: st.DataObject, safe_serialization: bool, tmp_path_factory: pytest.TempPathFactory
) -> None:
    model = adapted(arch, data.draw(toy_configs(arch)))
    randomize(model, 3)
    folder = tmp_path_factory.mktemp("adapter")
    check_save_load_round_trip(model, lambda: base_model(arch), lambda m: logits(m, arch), folder, safe_serialization)


def test_saved_config_and_model_card(tmp_path: Path) -> None:
    model = adapted("bert", toy("bert", scale=0.3))
    model.save_pretrained(tmp_path)
    config = read_json(tmp_path / CONFIG)
    assert config["peft_type"] == "TOY_DELTA"
    assert config["scale"] == 0.3
    assert config["inference_mode"] is True
    assert config["task_type"] == "SEQ_CLS"
    assert config["modules_to_save"] == ["classifier", "score"]
    assert model.peft_config["default"].inference_mode is False  # saving does not change the model's config
    card = (tmp_path / "README.md").read_text()
    assert "library_name: peft" in card
    keys = load_file(tmp_path / WEIGHTS)
    assert "base_model.model.classifier.weight" in keys
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.toy_d" in keys
    assert not [k for k in keys if ".default." in k or ".adapters." in k or "modules_to_save" in k]


def test_is_trainable(tmp_path: Path) -> None:
    adapted("gpt2").save_pretrained(tmp_path)
    loaded = grafting.PeftModel.from_pretrained(base_model("gpt2"), tmp_path, is_trainable=True)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable
    assert all(".toy_d" in n or ".modules_to_save." in n for n in trainable)
    assert loaded.peft_config["default"].inference_mode is False


# -- adapter names and folders -------------------------------------------------------------------------------
def _three_adapters(arch: str) -> Any:
    model = adapted(arch, toy(arch, scale=0.1))
    model.add_adapter("other", toy(arch, scale=0.2, target_modules="all-linear"))
    model.add_adapter("third", toy(arch, scale=0.05, target_modules=LINEAR[arch][1:3]))
    randomize(model, 5)
    return model


def _output_of(model: Any, arch: str, name: str) -> torch.Tensor:
    model.set_adapter(name)
    return logits(model, arch)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_non_default_adapters_go_to_subfolders(arch: str, tmp_path: Path) -> None:
    model = _three_adapters(arch)
    outputs = {name: _output_of(model, arch, name) for name in ("default", "other", "third")}
    model.save_pretrained(tmp_path)
    assert files_under(tmp_path) == sorted(
        ["README.md", CONFIG, WEIGHTS, f"other/{CONFIG}", f"other/{WEIGHTS}", f"third/{CONFIG}", f"third/{WEIGHTS}"]
    )
    # each subfolder loads on its own, under any name ...
    for name in ("other", "third"):
        alone = grafting.PeftModel.from_pretrained(base_model(arch), tmp_path, subfolder=name, adapter_name=name)
        assert alone.active_adapters == [name]
        assert_close(
            logits(alone, arch), outputs[name], changed_from=base_logits(arch), msg=f"{name} from its subfolder"
        )
        assert_identical(_tensors(alone, name), _tensors(model, name), name)
    # ... and all of them load back into one model
    loaded = grafting.PeftModel.from_pretrained(base_model(arch), tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    loaded.load_adapter(tmp_path, "third", subfolder="third")
    assert loaded.active_adapters == ["default"]
    for name, out in outputs.items():
        assert_close(_output_of(loaded, arch, name), out, changed_from=base_logits(arch), msg=f"{name} reloaded")


def test_selected_adapters(tmp_path: Path) -> None:
    model = _three_adapters("gpt2")
    out = _output_of(model, "gpt2", "other")
    model.save_pretrained(tmp_path, selected_adapters=["other"])
    assert files_under(tmp_path) == sorted(["README.md", f"other/{CONFIG}", f"other/{WEIGHTS}"])
    loaded = grafting.PeftModel.from_pretrained(base_model("gpt2"), tmp_path / "other", adapter_name="other")
    assert_close(logits(loaded, "gpt2"), out, changed_from=base_logits("gpt2"), msg="selected adapter")


def test_saving_an_unknown_adapter_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(AdapterNotFoundError, match="missing"):
        adapted("llama").save_pretrained(tmp_path / "out", selected_adapters=["default", "missing"])
    assert not (tmp_path / "out").exists()


def test_saving_into_a_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterLoadError, match="is a file"):
        adapted("llama").save_pretrained(tmp_path / "file")


# -- atomic writes -----------------------------------------------------------------------------------------
def _bytes(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in files_under(folder)}


def test_a_crash_while_saving_leaves_the_previous_files_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = adapted("llama")
    randomize(model, 1)
    model.save_pretrained(tmp_path)
    before = _bytes(tmp_path)
    out = logits(model, "llama")
    randomize(model, 2)  # new weights that must not half-reach the disk

    def crashing_writer(tensors: dict[str, torch.Tensor], path: str, metadata: Any = None) -> None:
        save_file(tensors, path, metadata=metadata)
        with open(path, "r+b") as fh:  # a partly written file, then the crash
            fh.truncate(os.path.getsize(path) // 2)
        raise OSError("No space left on device")

    monkeypatch.setattr(grafting_io, "save_file", crashing_writer)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(tmp_path)
    assert _bytes(tmp_path) == before  # same files, same bytes: no temporary file left behind
    loaded = grafting.PeftModel.from_pretrained(base_model("llama"), tmp_path)
    assert_close(logits(loaded, "llama"), out, changed_from=logits(model, "llama"), msg="the previous adapter")


def test_a_crash_while_writing_the_config_leaves_it_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = adapted("gpt2", toy("gpt2", scale=0.2))
    model.save_pretrained(tmp_path)
    before = _bytes(tmp_path)

    real_open = builtins.open

    def crashing_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if str(file).endswith(CONFIG) and "w" in mode:  # the config file, written into the save's staging folder
            raise OSError("disk went away")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", crashing_open)
    with pytest.raises(OSError, match="disk went away"):
        adapted("gpt2", toy("gpt2", scale=0.4)).save_pretrained(tmp_path)
    assert sorted(_bytes(tmp_path)) == sorted(before)  # no temporary file left behind
    assert read_json(tmp_path / CONFIG)["scale"] == 0.2


# -- load errors -------------------------------------------------------------------------------------------------
def _assert_untouched(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    assert_identical(state_of(model), before, "base model")


def test_a_folder_that_is_not_an_adapter(tmp_path: Path) -> None:
    model = base_model("llama")
    before = state_of(model)
    with pytest.raises(AdapterLoadError, match=r"adapter_config\.json is missing"):
        grafting.PeftModel.from_pretrained(model, tmp_path)
    (tmp_path / CONFIG).write_text(toy("llama").to_json_string())
    with pytest.raises(AdapterLoadError, match="holds no adapter weights"):
        grafting.PeftModel.from_pretrained(model, tmp_path)
    (tmp_path / WEIGHTS).write_bytes(b"definitely not safetensors")
    with pytest.raises(AdapterLoadError, match="cannot read adapter weights"):
        grafting.PeftModel.from_pretrained(model, tmp_path)
    with pytest.raises(AdapterLoadError, match="does not exist"):
        grafting.PeftModel.from_pretrained(model, tmp_path / "no" / "such" / "folder")
    _assert_untouched(model, before)


def _rewrite(folder: Path, change: Any) -> None:
    tensors = load_file(folder / WEIGHTS)
    change(tensors)
    save_file(tensors, folder / WEIGHTS)


V_PROJ_0 = "base_model.model.model.layers.0.self_attn.v_proj.toy_d"  # (8, 16): v_proj has one key-value head


def test_a_shape_mismatch_names_the_key(tmp_path: Path) -> None:
    adapted("llama").save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.__setitem__(V_PROJ_0, torch.zeros(4, 16)))
    model = base_model("llama")
    before = state_of(model)
    with pytest.raises(AdapterLoadError, match=r"v_proj\.toy_d has shape \(4, 16\) in the file but \(8, 16\)"):
        grafting.PeftModel.from_pretrained(model, tmp_path)
    _assert_untouched(model, before)


def test_unexpected_keys_fail_a_strict_load(tmp_path: Path) -> None:
    source = adapted("gpt2")
    randomize(source, 1)
    source.save_pretrained(tmp_path)
    extra = "base_model.model.transformer.h.0.attn.c_proj.toy_d"
    _rewrite(tmp_path, lambda t: t.__setitem__(extra, torch.zeros(8, 16)))
    model = base_model("gpt2")
    before = state_of(model)
    with pytest.raises(AdapterLoadError, match=r"fit no adapter tensor.*c_proj\.toy_d"):
        grafting.PeftModel.from_pretrained(model, tmp_path)
    _assert_untouched(model, before)
    relaxed = grafting.PeftModel.from_pretrained(base_model("gpt2"), tmp_path, strict=False)
    assert_close(
        logits(relaxed, "gpt2"), logits(source, "gpt2"), changed_from=base_logits("gpt2"), msg="non-strict load"
    )


def test_missing_keys_fail_the_load(tmp_path: Path) -> None:
    adapted("gpt2").save_pretrained(tmp_path)
    missing = "base_model.model.transformer.h.1.attn.c_attn.toy_d"
    _rewrite(tmp_path, lambda t: t.pop(missing))
    for strict in (True, False):
        model = base_model("gpt2")
        before = state_of(model)
        with pytest.raises(AdapterLoadError, match=r"h\.1\.attn\.c_attn"):
            grafting.PeftModel.from_pretrained(model, tmp_path, strict=strict)
        _assert_untouched(model, before)


def test_a_failing_load_adapter_leaves_the_model_unchanged(tmp_path: Path) -> None:
    adapted("llama").save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.__setitem__(V_PROJ_0, torch.zeros(4, 16)))  # a tensor of another shape
    model = adapted("llama")
    randomize(model, 1)
    out = logits(model, "llama")
    modules = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(AdapterLoadError, match="shape"):
        model.load_adapter(tmp_path, "second")
    assert list(model.peft_config) == ["default"]
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert_close(logits(model, "llama"), out, changed_from=base_logits("llama"), msg="after the failed load")


def test_set_state_dict_checks_every_shape_before_writing() -> None:
    model = adapted("llama")
    randomize(model, 1)
    before = _tensors(model)
    bad = {k: torch.ones_like(v) for k, v in before.items()}
    bad["base_model.model.model.layers.1.self_attn.v_proj.toy_d"] = torch.ones(3, 3)
    with pytest.raises(AdapterLoadError, match=r"layers\.1\.self_attn\.v_proj\.toy_d"):
        set_peft_model_state_dict(model, bad)
    assert_identical(_tensors(model), before, "adapter after a refused load")


# -- low_cpu_mem_usage -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_low_cpu_mem_usage_keeps_adapters_on_meta_until_loaded(arch: str) -> None:
    source = adapted(arch, toy(arch, target_modules="all-linear"))
    randomize(source, 4)
    model = grafting.get_peft_model(base_model(arch), source.peft_config["default"], low_cpu_mem_usage=True)
    params = dict(model.named_parameters())
    toy_params = {n: p for n, p in params.items() if ".toy_" in n}
    assert toy_params
    assert all(p.is_meta for p in toy_params.values())
    assert not any(p.is_meta for n, p in params.items() if n not in toy_params)
    result = set_peft_model_state_dict(model, _tensors(source))
    assert result.missing_keys == []
    assert result.unexpected_keys == []
    assert not any(p.is_meta for p in model.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if ".toy_" in n)
    assert_close(logits(model, arch), logits(source, arch), changed_from=base_logits(arch), msg="materialized adapter")
