"""The ``grafting`` command line: plugins, inspect, merge, and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import grafting
from grafting import AdapterConfig, LoraConfig, PeftModel, get_peft_model
from grafting.cli import main
from grafting.registry import plugins
from grafting.testing import assert_close, model_output, sample_inputs, tiny_llama
from tests.toy_methods import ToyOutputConfig

INPUTS = sample_inputs("llama", batch=2, length=5)


def save_lora(folder: Path, *, seed: int = 0, r: int = 4, targets: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """A LoRA adapter with random A and B (so it changes the outputs) saved on a tiny Llama."""
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
    get_peft_model(tiny_llama(), config).save_pretrained(folder)
    return folder


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_lora(tmp_path_factory.mktemp("cli") / "lora")


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli") / "base"
    tiny_llama().save_pretrained(folder)
    return folder


# -- plugins ------------------------------------------------------------------------------------
def test_plugins_lists_lora_with_its_distribution_and_entry_point(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_cli(capsys, "plugins")
    assert status == (1 if plugins.get_registry().failures else 0)
    line = next(line for line in out.splitlines() if line.startswith("LORA "))
    assert line.split()[:4] == ["LORA", "lora", "layer", "grafting-lora"]
    assert "grafting_lora.plugin" in line

    status, out, _ = run_cli(capsys, "plugins", "--json")
    methods = {m["peft_type"]: m for m in json.loads(out)["methods"]}
    assert methods["LORA"]["distribution"] == "grafting-lora"
    assert methods["LORA"]["config"] == "LoraConfig"


def test_plugins_reports_a_plugin_that_fails_to_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An installed distribution whose entry point cannot be imported: listed with its error, exit status 1."""
    info = tmp_path / "grafting_broken-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: grafting-broken\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[grafting]\nbroken = grafting_broken_mod.plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_registry", None)  # rediscover, then restored after the test

    status, out, _ = run_cli(capsys, "plugins")
    assert status == 1
    assert "LORA" in out  # the other plugins still load
    failed = out[out.index("failed to load") :]
    assert "broken = grafting_broken_mod.plugin (from grafting-broken)" in failed
    assert "ModuleNotFoundError" in failed
    assert "grafting_broken_mod" in failed

    status, out, _ = run_cli(capsys, "plugins", "--json")
    (failure,) = [f for f in json.loads(out)["failures"] if f["distribution"] == "grafting-broken"]
    assert failure["entry_point"] == "broken = grafting_broken_mod.plugin"
    assert "Traceback" in failure["traceback"]


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "grafting"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"grafting {grafting.__version__}"


# -- inspect --------------------------------------------------------------------------------------
def test_inspect_reports_method_targets_parameters_and_dtypes(
    adapter: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tensors = load_file(adapter / "adapter_model.safetensors")
    status, out, _ = run_cli(capsys, "inspect", str(adapter), "--json")
    assert status == 0
    info = json.loads(out)
    assert info["method"]["peft_type"] == "LORA"
    assert info["method"]["distribution"] == "grafting-lora"
    assert info["config"]["lora_alpha"] == 8
    assert info["options"]["r"] == 4  # options: what differs from LoraConfig's defaults (r=8, lora_alpha=8)
    assert "lora_alpha" not in info["options"]
    assert info["targets"] == [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
    assert info["parameters"] == sum(t.numel() for t in tensors.values())
    assert info["tensors"] == len(tensors) == 8
    assert info["dtypes"] == {"float32": 8}
    assert info["size_bytes"] == (adapter / "adapter_model.safetensors").stat().st_size
    assert info["check"] == {"ok": True, "problems": [], "shapes_checked": True}

    status, out, _ = run_cli(capsys, "inspect", str(adapter))
    assert status == 0
    assert "LORA (lora, from grafting-lora" in out
    assert "model.layers.[0-1].self_attn.q_proj" in out
    assert f"{info['parameters']:,} in 8 tensors" in out
    assert "check       ok" in out


def test_inspect_flags_non_finite_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = save_lora(tmp_path / "nan")
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key][0, :2] = torch.tensor([float("nan"), float("inf")])
    save_file(tensors, path)
    status, out, _ = run_cli(capsys, "inspect", str(folder), "--json")
    assert status == 1
    (problem,) = json.loads(out)["check"]["problems"]
    assert problem.startswith(key)
    assert "2 of" in problem


def test_inspect_flags_shapes_that_contradict_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = save_lora(tmp_path / "rank", r=4)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["r"] = 6
    config_path.write_text(json.dumps(config))
    status, out, _ = run_cli(capsys, "inspect", str(folder))
    assert status == 1
    assert "FAILED, 4 problem(s)" in out
    assert "model.layers.0.self_attn.q_proj: rank 4" in out
    assert "r=6" in out


def test_inspect_flags_a_missing_half_of_a_pair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = save_lora(tmp_path / "pair")
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, path)
    status, out, _ = run_cli(capsys, "inspect", str(folder), "--json")
    assert status == 1
    assert json.loads(out)["check"]["problems"] == ["model.layers.1.self_attn.v_proj: has lora_A but not lora_B"]


@pytest.mark.parametrize(
    "options",
    [
        {"use_dora": True},
        {"lora_bias": True},
        {"target_modules": ["embed_tokens", "q_proj"]},
        {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 4}},
    ],
    ids=["dora", "lora_bias", "embedding", "rank_pattern"],
)
def test_inspect_accepts_every_lora_variant(options: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = LoraConfig(**{"r": 4, "target_modules": ["q_proj", "v_proj"], **options})
    get_peft_model(tiny_llama(), config).save_pretrained(tmp_path / "variant")
    status, out, _ = run_cli(capsys, "inspect", str(tmp_path / "variant"), "--json")
    info = json.loads(out)
    assert info["check"] == {"ok": True, "problems": [], "shapes_checked": True}
    assert status == 0
    expected = {f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")}
    if "embed_tokens" in config.target_modules:
        expected = {"model.embed_tokens"} | {t for t in expected if t.endswith("q_proj")}
    assert set(info["targets"]) == expected


def test_inspect_flags_a_dora_vector_the_config_does_not_expect(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    status, out, _ = run_cli(capsys, "inspect", str(tmp_path), "--json")
    assert status == 1
    problems = json.loads(out)["check"]["problems"]
    assert len(problems) == 2  # one per layer
    assert all("unexpected lora_magnitude_vector" in p and "use_dora=False" in p for p in problems)


# -- merge ----------------------------------------------------------------------------------------
def test_merge_writes_a_standalone_model_with_the_adapter_folded_in(
    adapter: Path, base_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM

    out_dir = tmp_path / "merged"
    status, out, err = run_cli(
        capsys, "merge", "--base", str(base_folder), "--adapter", str(adapter), "--out", str(out_dir)
    )
    assert status == 0, err
    assert "merging" in err  # the progress bar
    assert "merged 1 adapter(s) (LORA: lora) into 4 layers" in out
    merged = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    assert not any("lora" in k for k in merged.state_dict())
    expected = model_output(PeftModel.from_pretrained(tiny_llama(), adapter), INPUTS)
    base = model_output(tiny_llama(), INPUTS)
    assert_close(model_output(merged, INPUTS), expected, changed_from=base, msg="merged model")


def test_merge_folds_several_adapters_of_mixed_methods(
    adapter: Path, base_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], toy_methods: object
) -> None:
    """LoRA on q_proj/v_proj, a second LoRA on k_proj and an output scaling on q_proj: one merged model."""
    from transformers import AutoModelForCausalLM

    second = save_lora(tmp_path / "second", seed=1, r=2, targets=("k_proj",))
    toy = get_peft_model(tiny_llama(), ToyOutputConfig(target_modules=["q_proj"]), adapter_name="scale", mixed=True)
    toy.save_pretrained(tmp_path / "scaled", selected_adapters=["scale"])
    scaled = tmp_path / "scaled" / "scale"

    out_dir = tmp_path / "merged"
    argv = ["merge", "--base", str(base_folder), "--out", str(out_dir)]
    for folder in (adapter, second, scaled):
        argv += ["--adapter", str(folder)]
    status, out, err = run_cli(capsys, *argv)
    assert status == 0, err
    assert "merged 3 mixed adapter(s) (LORA, TOY_OUTPUT: lora, second, scale)" in out

    config = AdapterConfig.from_pretrained(adapter)
    reference = PeftModel.from_pretrained(tiny_llama(), adapter, adapter_name="lora", config=config, mixed=True)
    reference.load_adapter(second, adapter_name="second")
    reference.load_adapter(scaled, adapter_name="scale")
    reference.set_adapter(["lora", "second", "scale"])
    merged = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    only_first = model_output(PeftModel.from_pretrained(tiny_llama(), adapter), INPUTS)  # the other two take part
    assert_close(model_output(merged, INPUTS), model_output(reference, INPUTS), changed_from=only_first, msg="merged")


def test_merge_refuses_a_non_empty_output_folder(
    adapter: Path, base_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    argv = ["merge", "--base", str(base_folder), "--adapter", str(adapter), "--out", str(tmp_path / "taken")]
    status, _, err = run_cli(capsys, *argv)
    assert status == 1
    assert "not empty" in err
    assert "--force" in err
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]


# -- errors -----------------------------------------------------------------------------------------
def _unknown_method(tmp_path: Path) -> Path:
    folder = tmp_path / "unknown"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "NO_SUCH_METHOD", "r": 4}))
    return folder


def _not_an_adapter(tmp_path: Path) -> Path:
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    return folder


ERROR_CASES = {
    "missing path": (lambda tmp: tmp / "nowhere", "does not exist"),
    "not an adapter": (_not_an_adapter, "is not an adapter folder: it has no adapter_config.json"),
    "unknown method": (_unknown_method, "no installed grafting plugin provides the method 'NO_SUCH_METHOD'"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
@pytest.mark.parametrize("command", ["inspect", "merge"])
def test_errors_are_one_line_and_a_non_zero_exit(
    case: str, command: str, base_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make, message = ERROR_CASES[case]
    path = str(make(tmp_path))
    argv = [command, path] if command == "inspect" else ["merge", "--base", str(base_folder), "--adapter", path]
    if command == "merge":
        argv += ["--out", str(tmp_path / "out")]
    status, out, err = run_cli(capsys, *argv)
    assert status == 1
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"grafting {command}: error: ")
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_merge_reports_a_base_that_is_not_a_model(
    adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for base, message in ((tmp_path / "absent", "does not exist"), (adapter, "not a transformers model folder")):
        argv = ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out")]
        status, _, err = run_cli(capsys, *argv)
        assert status == 1
        assert err.count("\n") == 1
        assert message in err


def test_a_folder_of_adapters_names_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """PEFT saves adapters other than ``default`` in subfolders: the error says where they are."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="first")
    model.add_adapter("second", LoraConfig(r=2, target_modules=["v_proj"]))
    model.save_pretrained(tmp_path / "many")
    status, _, err = run_cli(capsys, "inspect", str(tmp_path / "many"))
    assert status == 1
    assert "holds adapters in: first, second" in err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["merge", "--base", "x"])
    assert exc.value.code == 2
    assert "--adapter" in capsys.readouterr().err


def test_inspect_adapter_is_the_public_form_of_grafting_inspect(tmp_path: Path) -> None:
    from grafting.errors import AdapterLoadError

    folder = tmp_path / "adapter"
    get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(folder)
    info = grafting.inspect_adapter(folder)
    assert info["method"]["peft_type"] == "LORA"
    assert info["check"]["ok"]
    assert info["targets"] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert info["parameters"] == sum(t.numel() for t in grafting.load_peft_weights(str(folder)).values())
    with pytest.raises(AdapterLoadError, match="not an adapter folder"):
        grafting.inspect_adapter(tmp_path)
