"""Issue 25's rows 8 and 11: options that could make a build or a load hang, read files or fail inside
transformers are refused at once with a ConfigError naming the option.

On the toy methods (tests/toy_methods.py); LoRA's own options are plugins/lora/tests/test_lora_bounded_options.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

import grafting
from grafting.errors import AdapterLoadError, ConfigError
from grafting.testing import assert_close, edit_saved_config
from tests.helpers import base_model, logits, randomize, toy
from tests.helpers import toy_adapted as adapted
from tests.toy_methods import ToyDeltaConfig

pytestmark = pytest.mark.usefixtures("toy_methods")

CATASTROPHIC = r"((\w|\.)+)+Z"


def peft_folder(tmp_path: Path, **changes: Any) -> Path:
    """A saved toy adapter whose adapter_config.json is then edited with ``changes``."""
    adapted("llama").save_pretrained(tmp_path)
    edit_saved_config(tmp_path, **changes)
    return tmp_path


OPTIONS = {
    "target_modules": {"target_modules": CATASTROPHIC},
    "exclude_modules": {"exclude_modules": CATASTROPHIC},
    "layers_pattern": {"layers_pattern": CATASTROPHIC, "layers_to_transform": [0], "target_modules": ["q_proj"]},
}


@pytest.mark.parametrize("option", OPTIONS)
def test_row08_a_pattern_or_count_that_would_hang_is_refused_on_build_and_on_load(option: str, tmp_path: Path) -> None:
    changes = OPTIONS[option]
    start = time.monotonic()
    with pytest.raises(ConfigError, match=rf"ToyDeltaConfig\.{option}"):
        ToyDeltaConfig(**{"target_modules": ["q_proj"], **changes})
    spent = time.monotonic() - start
    folder = peft_folder(tmp_path, **changes)
    base = base_model("llama")
    start = time.monotonic()  # the refusals are timed, not the save and the base model the test builds
    with pytest.raises(ConfigError, match=option):
        grafting.PeftModel.from_pretrained(base, folder)
    assert spent + time.monotonic() - start < 30  # the hang ran past 30 s; a refusal is immediate


@pytest.mark.parametrize("pattern", [".*.*.*.*Z", "(a|ab)*c", "(?:x*y)*", "(.*){2,}"])
def test_row08_repeats_inside_repeats_or_too_many_repeats_are_refused(pattern: str) -> None:
    with pytest.raises(ConfigError, match="exponential time"):
        ToyDeltaConfig(target_modules=pattern)


@pytest.mark.parametrize(
    "pattern",
    [r".*\.(q_proj|v_proj)", r".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$", r"model\.layers\.\d+\.mlp\.\w+"],
)
def test_row08_usual_regexes_still_select_modules(pattern: str) -> None:
    config = ToyDeltaConfig(target_modules=pattern)
    assert config.target_modules == pattern


def test_row08_a_million_tensor_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    adapted("llama").save_pretrained(tmp_path)
    entries = ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(1_000_000))
    header = ("{" + entries + "}").encode()
    (tmp_path / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(AdapterLoadError, match="lists more tensors than an adapter holds"):
        grafting.PeftModel.from_pretrained(base_model("llama"), tmp_path)


def test_row11_layers_pattern_is_a_name_not_a_regex() -> None:
    with pytest.raises(grafting.TargetNotFoundError, match="matches no module"):
        adapted("llama", toy("llama", layers_to_transform=[0], layers_pattern="layers|x"))
    model = adapted("llama", toy("llama", layers_to_transform=[0], layers_pattern="layers"))
    assert all(".layers.0." in name for name, _ in model.base_model.adapted_layers())


def test_row11_save_never_reads_a_broken_base_config_or_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    def no_network(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a save went to the network")

    monkeypatch.setattr(huggingface_hub, "file_exists", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    (base_dir / "config.json").write_text("not json {")
    for name in (str(base_dir), "someone/some-model"):
        model = adapted("llama")
        model.peft_config["default"].base_model_name_or_path = name
        with pytest.warns(UserWarning, match="cannot read the config of the base model"):
            model.save_pretrained(tmp_path / "out")
    (base_dir / "config.json").write_text(json.dumps({"vocab_size": 10**6}))  # another vocabulary: resized
    model = adapted("llama")
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    with pytest.warns(UserWarning, match="the embedding layer has been resized"):
        model.save_pretrained(tmp_path / "out")


@pytest.mark.parametrize(("arch", "name"), [("llama", "model"), ("gpt2", "transformer"), ("llama", "model.layers")])
def test_row11_modules_to_save_of_the_backbone_or_a_container_is_a_config_error(arch: str, name: str) -> None:
    base = base_model(arch)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ConfigError, match=rf"modules_to_save=\['{name}'\]: {name} cannot be copied"):
        grafting.get_peft_model(base, toy(arch, modules_to_save=[name]))
    assert all(base.state_dict()[k].equal(v) for k, v in before.items())


def test_modules_to_save_of_a_head_still_trains_a_copy() -> None:
    model = adapted("llama", toy("llama", modules_to_save=["lm_head"]))
    before = logits(model, "llama")
    randomize(model, 2)
    assert_close(logits(model, "llama"), logits(model, "llama"), changed_from=before)


@pytest.mark.parametrize("subfolder", ["/tmp", "../elsewhere", "a/../../elsewhere", "link"])
def test_a_subfolder_outside_the_folder_is_refused(subfolder: str, tmp_path: Path) -> None:
    adapted("llama").save_pretrained(tmp_path / "elsewhere")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(AdapterLoadError, match="leads out of"):
        grafting.PeftModel.from_pretrained(base_model("llama"), tmp_path / "folder", subfolder=subfolder)
