"""Export to plain LoRA (``save_as_lora``, ``convert_to_lora``, ``grafting export``): PEFT loads the result, and
its outputs differ from the source adapter's by no more than the reported error."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import grafting
from grafting.api.export import VLLM_RANKS, convert_to_lora, export_lora, save_as_lora
from grafting.cli import main as cli_main
from grafting.errors import ExportError
from grafting.model.matching import physical_path
from grafting.testing import assert_close, assert_identical, randomize_adapters, tiny_llama

peft = pytest.importorskip("peft")  # the oracle; installed with the test dependencies

ATTN = ["q_proj", "v_proj"]
SOURCES: dict[str, list[Callable[[], Any]]] = {
    "dora": [lambda: grafting.LoraConfig(r=3, lora_alpha=6, target_modules=ATTN, use_dora=True)],
    "loha": [lambda: grafting.LoHaConfig(r=2, alpha=3, target_modules=[*ATTN, "down_proj"])],
    "ia3": [lambda: grafting.IA3Config(target_modules=[*ATTN, "down_proj"], feedforward_modules=["down_proj"])],
    "vera": [lambda: grafting.VeraConfig(r=4, target_modules=ATTN)],
    # three methods stacked on the same layers of a mixed model, exported as one LoRA
    "stack": [
        lambda: grafting.LoraConfig(r=2, target_modules=ATTN),
        lambda: grafting.IA3Config(target_modules=ATTN, feedforward_modules=[]),
        lambda: grafting.LoHaConfig(r=2, target_modules=ATTN),
    ],
}


def _source(case: str, seed: int = 0) -> tuple[grafting.PeftModel, list[str]]:
    """A float64 tiny Llama with the case's adapters, randomized; all of them active."""
    factories = SOURCES[case]
    names = [f"a{i}" for i in range(len(factories))]
    model = grafting.get_peft_model(
        tiny_llama(seed=seed).double(), factories[0](), adapter_name=names[0], mixed=len(names) > 1
    )
    for name, make in zip(names[1:], factories[1:]):
        model.add_adapter(name, make())
    model.double()
    randomize_adapters(model, seed=seed)
    model.set_adapter(names)
    return model.eval(), names


def _peft_load(folder: Path, seed: int = 0) -> Any:
    return peft.PeftModel.from_pretrained(tiny_llama(seed=seed).double(), folder).eval()


def _linear_map(layer: torch.nn.Module, n_in: int) -> torch.Tensor:
    """The (out, in) matrix a linear map computes, read from its outputs on the identity."""
    with torch.no_grad():
        return layer(torch.eye(n_in, dtype=torch.float64)).T


@pytest.mark.parametrize("case", list(SOURCES))
def test_a_full_rank_export_loads_in_peft_with_the_source_logits(case: str, tmp_path: Path) -> None:
    source, names = _source(case)
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = source(input_ids=ids).logits
        with source.disable_adapter():
            base = source(input_ids=ids).logits
    exported = save_as_lora(tmp_path / "lora", source, 16, names)  # 16 = the layers' smallest dimension
    assert exported.max_relative_error < 1e-12
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["r"], saved["lora_alpha"], saved["use_dora"]) == ("LORA", 16, 16, False)
    with torch.no_grad():
        got = _peft_load(tmp_path / "lora")(input_ids=ids).logits
    assert_close(got, expected, changed_from=base, msg=f"{case} exported at full rank")


@settings(max_examples=3, deadline=None)
@pytest.mark.parametrize("case", list(SOURCES))
@given(seed=st.integers(0, 2**16), rank=st.integers(1, 6))
def test_each_layer_differs_by_no_more_than_its_reported_error(
    case: str, seed: int, rank: int, tmp_path_factory: Any
) -> None:
    """Per layer: the exported ΔW's relative Frobenius error is the reported one, and its largest singular
    value (the bound on the layer's output error per unit input) is the reported spectral error."""
    source, names = _source(case, seed)
    folder = tmp_path_factory.mktemp("lora")
    exported = save_as_lora(folder, source, rank, names)
    loaded = _peft_load(folder, seed)
    tuner = source.base_model
    with torch.no_grad():
        for layer in exported.layers:
            ours = tuner.model.get_submodule(physical_path(tuner.model, layer.name))
            theirs = loaded.base_model.model.get_submodule(layer.name)
            n_in = ours.base_layer.in_features
            base = _linear_map(ours.base_layer, n_in)
            true_delta = _linear_map(ours, n_in) - base
            error = _linear_map(theirs, n_in) - base - true_delta
            assert layer.rank == rank
            assert_close(
                torch.tensor(layer.norm, dtype=torch.float64), torch.linalg.matrix_norm(true_delta), msg=layer.name
            )
            assert_close(
                torch.tensor(layer.spectral, dtype=torch.float64),
                torch.linalg.matrix_norm(error, ord=2),
                atol=1e-12,
                msg=layer.name,
            )
            relative = torch.linalg.matrix_norm(error) / torch.linalg.matrix_norm(true_delta)
            assert_close(torch.tensor(layer.relative, dtype=torch.float64), relative, atol=1e-12, msg=layer.name)
            x = torch.randn(5, n_in, dtype=torch.float64)
            gap = (theirs(x) - ours(x)).norm(dim=-1)
            assert (gap <= layer.spectral * x.norm(dim=-1) * (1 + 1e-9) + 1e-12).all(), layer.name


def test_max_error_picks_per_layer_ranks_and_meets_the_bound(tmp_path: Path) -> None:
    """LoRA of rank 1 on q_proj and 4 on v_proj: a tiny max_error finds exactly those ranks; a loose one fewer."""
    model = grafting.get_peft_model(
        tiny_llama().double(), grafting.LoraConfig(r=4, rank_pattern={"q_proj": 1}, target_modules=ATTN)
    )
    model.double()
    randomize_adapters(model)
    exported = save_as_lora(tmp_path / "lora", model, None, max_error=1e-9)
    ranks = {layer.name: layer.rank for layer in exported.layers}
    assert ranks == {name: 1 if name.endswith("q_proj") else 4 for name in ranks}
    assert exported.max_relative_error <= 1e-9
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    for name, rank in ranks.items():
        assert config["rank_pattern"].get(name, config["r"]) == rank
    loaded = _peft_load(tmp_path / "lora")
    for name, rank in ranks.items():
        assert loaded.base_model.model.get_submodule(name).lora_A["default"].weight.shape[0] == rank
    loose = export_lora(model, None, max_error=0.5)
    assert all(layer.relative <= 0.5 for layer in loose.layers)
    assert sum(layer.rank for layer in loose.layers) < sum(ranks.values())


def test_convert_to_lora_has_peft_signature_and_float_rank_is_an_energy_threshold() -> None:
    source, names = _source("vera")
    config, tensors = convert_to_lora(source, 0.9, adapter_name=names[0])
    assert config.peft_type == "LORA"
    assert all(key.startswith("base_model.model.model.layers.") for key in tensors)
    exported = export_lora(source, 0.9, names[0])
    for layer in exported.layers:
        assert layer.relative**2 <= 0.1 + 1e-12  # the kept singular values hold >= 90% of ‖ΔW‖²
        assert layer.rank == 1 or export_lora(source, layer.rank - 1, names[0]).layers[0].relative ** 2 > 0  # minimal


def test_for_vllm_pads_to_an_allowed_rank_with_the_same_outputs(tmp_path: Path) -> None:
    source, names = _source("dora")
    plain = save_as_lora(tmp_path / "plain", source, 5, names)
    served = save_as_lora(tmp_path / "vllm", source, 5, names, serving="vllm")
    assert {layer.rank for layer in served.layers} == {8}
    assert 8 in VLLM_RANKS
    config = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 8
    assert config["target_modules"] == sorted(ATTN) or sorted(config["target_modules"]) == sorted(ATTN)
    assert not config["use_dora"]
    assert config["modules_to_save"] is None
    assert config["bias"] == "none"
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = _peft_load(tmp_path / "plain")(input_ids=ids).logits
        b = _peft_load(tmp_path / "vllm")(input_ids=ids).logits
    assert_identical(b, a)  # the padding is zeros: not a bit changes
    assert [x.relative for x in plain.layers] == [x.relative for x in served.layers]


@pytest.mark.parametrize(
    ("make", "serving", "rank", "message"),
    [
        (lambda: grafting.LoraConfig(r=2, target_modules=["lm_head", "q_proj"]), "vllm", 8, "projection layers only"),
        (
            lambda: grafting.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
            None,
            8,
            "modules_to_save",
        ),
        (lambda: grafting.LoraConfig(r=2, target_modules=["q_proj"], bias="all"), "sglang", 8, "trains biases"),
        (lambda: grafting.LoraConfig(r=2, target_modules=["q_proj"]), "vllm", 600, "ranks up to 512"),
        (lambda: grafting.LoraConfig(r=2, target_modules=["q_proj"]), "tgi", 8, "unknown serving stack"),
        (lambda: grafting.LoraConfig(r=2, target_modules=["q_proj"]), None, 0, "rank must be at least 1"),
        (lambda: grafting.LoraConfig(r=2, target_modules=["q_proj"]), None, 1.5, "energy threshold"),
    ],
)
def test_what_cannot_be_met_is_refused_and_nothing_changes(
    make: Callable[[], Any], serving: str | None, rank: Any, message: str, tmp_path: Path
) -> None:
    model = grafting.get_peft_model(tiny_llama(), make())
    randomize_adapters(model)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(ExportError, match=message):
        save_as_lora(tmp_path / "out", model, rank, serving=serving)
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    assert_identical(model.state_dict(), before)


def test_a_prompt_adapter_does_not_export() -> None:
    model = grafting.get_peft_model(
        tiny_llama(), grafting.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    )
    with pytest.raises(ExportError, match="nothing to export"):
        export_lora(model, 4)


def test_cli_export_stacks_adapters_for_vllm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    source, names = _source("stack")
    source.save_pretrained(tmp_path / "adapters")
    folders = [str(tmp_path / "adapters" / n) for n in names]
    argv = ["export", "--base", str(tmp_path / "base"), "--out", str(tmp_path / "lora"), "--max-error", "0.01"]
    argv += ["--for", "vllm", "--json"] + [arg for f in folders for arg in ("--adapter", f)]
    assert cli_main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rank"] in VLLM_RANKS
    assert all(layer["relative"] <= 0.01 for layer in report["layers"])
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    reloaded = grafting.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapters", mixed=True)
    with torch.no_grad():
        expected = reloaded(input_ids=ids).logits
        with reloaded.disable_adapter():
            plain = reloaded(input_ids=ids).logits
        got = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora")(input_ids=ids).logits
    assert_close(got, expected, changed_from=plain, rtol=1e-3, atol=1e-3, msg="exported stack, 1% error per layer")

    again = ["export", "--base", str(tmp_path / "base"), "--out", str(tmp_path / "lora"), "--force"]
    assert cli_main([*again, "--rank", "600", "--for", "vllm", "--adapter", folders[0]]) == 1
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]  # after transformers' load bars
    assert last == "grafting export: error: vLLM loads ranks up to 512; this export needs rank 600"


# -- convolutions and embeddings ------------------------------------------------------------------------------
class ConvNet(torch.nn.Module):
    """A 2-d and a 1-d convolution and a linear head: the layer kinds PEFT's LoRA holds beside linear ones."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.conv1d = torch.nn.Conv1d(6, 5, 3, padding=1)
        self.head = torch.nn.Linear(80, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x))  # (batch, 6, 4, 4)
        h = torch.tanh(self.conv1d(h.flatten(2)))  # (batch, 5, 16)
        return self.head(h.flatten(1))


CONV_SOURCES: dict[str, list[Callable[[], Any]]] = {
    "lora": [lambda: grafting.LoraConfig(r=2, lora_alpha=5, target_modules=["conv", "conv1d", "head"])],
    "loha": [lambda: grafting.LoHaConfig(r=2, alpha=3, target_modules=["conv", "conv1d"])],
    "loha-effective": [lambda: grafting.LoHaConfig(r=2, use_effective_conv2d=True, target_modules=["conv"])],
    "lokr": [lambda: grafting.LoKrConfig(r=2, alpha=3, target_modules=["conv", "conv1d"])],
    "stack": [
        lambda: grafting.LoraConfig(r=2, target_modules=["conv", "conv1d"]),
        lambda: grafting.LoHaConfig(r=2, target_modules=["conv"]),
    ],
}
EMBEDDING_SOURCES: dict[str, list[Callable[[], Any]]] = {
    "lora": [lambda: grafting.LoraConfig(r=3, lora_alpha=4, target_modules=["embed_tokens", "q_proj"])],
    "lora+oft": [
        lambda: grafting.LoraConfig(r=2, target_modules=["embed_tokens"]),
        lambda: grafting.OFTConfig(r=2, oft_block_size=0, target_modules=["embed_tokens"]),
    ],
}
IMAGES = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
IDS = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def _stacked(base: torch.nn.Module, factories: list[Callable[[], Any]], seed: int) -> tuple[Any, list[str]]:
    names = [f"a{i}" for i in range(len(factories))]
    model = grafting.get_peft_model(base.double(), factories[0](), adapter_name=names[0], mixed=len(names) > 1)
    for name, make in zip(names[1:], factories[1:]):
        model.add_adapter(name, make())
    model.double()
    randomize_adapters(model, seed=seed)
    model.set_adapter(names)
    return model.eval(), names


def _outputs(model: Any, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model(IMAGES) if kind == "conv" else model(input_ids=IDS).logits


@pytest.mark.parametrize(
    ("kind", "case"), [("conv", c) for c in CONV_SOURCES] + [("embedding", c) for c in EMBEDDING_SOURCES]
)
def test_convolutions_and_embeddings_export_exactly_at_full_rank(kind: str, case: str, tmp_path: Path) -> None:
    make_base = ConvNet if kind == "conv" else tiny_llama
    sources = CONV_SOURCES if kind == "conv" else EMBEDDING_SOURCES
    source, names = _stacked(make_base(), sources[case], seed=2)
    expected = _outputs(source, kind)
    with source.disable_adapter():
        base = _outputs(source, kind)
    exported = save_as_lora(tmp_path / "lora", source, 64, names)  # 64: at least every layer's smaller side
    assert exported.max_relative_error < 1e-12
    loaded = peft.PeftModel.from_pretrained(make_base().double(), tmp_path / "lora").eval()
    assert_close(_outputs(loaded, kind), expected, changed_from=base, msg=f"{kind} {case} at full rank")


def _patches(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per output position, the norm of the input patch the convolution multiplies (its kernel's receptive field)."""
    if isinstance(layer, torch.nn.Conv1d):
        x, kernel, padding = x[..., None], (layer.kernel_size[0], 1), (layer.padding[0], 0)
    else:
        kernel, padding = layer.kernel_size, layer.padding
    return torch.nn.functional.unfold(x, kernel, padding=padding).norm(dim=1)  # (batch, positions)


@settings(max_examples=2, deadline=None)
@pytest.mark.parametrize("case", list(CONV_SOURCES))
@given(seed=st.integers(0, 2**16), rank=st.integers(1, 3))
def test_a_conv_layer_differs_by_no_more_than_its_reported_error(
    case: str, seed: int, rank: int, tmp_path_factory: Any
) -> None:
    """Per convolution and output position: ``‖(ΔW − B·A)·patch‖ ≤ spectral · ‖patch‖``, the exported layer
    loaded by PEFT against the source's; the reported relative error is the factors' own."""
    source, names = _stacked(ConvNet(), CONV_SOURCES[case], seed)
    folder = tmp_path_factory.mktemp("lora")
    exported = save_as_lora(folder, source, rank, names)
    loaded = peft.PeftModel.from_pretrained(ConvNet().double(), folder).eval()
    tuner = source.base_model
    inputs = {"conv": IMAGES, "conv1d": torch.randn(2, 6, 16, dtype=torch.float64), "head": torch.randn(2, 80).double()}
    with torch.no_grad():
        for layer in exported.layers:
            ours = tuner.model.get_submodule(physical_path(tuner.model, layer.name))
            theirs = loaded.base_model.model.get_submodule(layer.name)
            x = inputs[layer.name]
            gap = (theirs(x) - ours(x)).flatten(2).norm(dim=1) if x.dim() > 2 else (theirs(x) - ours(x)).norm(dim=-1)
            bound = layer.spectral * (_patches(ours.base_layer, x) if x.dim() > 2 else x.norm(dim=-1))
            assert (gap <= bound * (1 + 1e-9) + 1e-12).all(), layer.name
            assert layer.rank == rank, layer.name
            assert 0 <= layer.relative <= 1, layer.name


def test_an_embedding_row_differs_by_no_more_than_its_reported_error(tmp_path: Path) -> None:
    """A looked-up row is the table's column for a unit input: its error is at most the spectral error."""
    source, names = _stacked(tiny_llama(), EMBEDDING_SOURCES["lora+oft"], seed=3)
    exported = save_as_lora(tmp_path / "lora", source, 2, names)
    loaded = peft.PeftModel.from_pretrained(tiny_llama().double(), tmp_path / "lora").eval()
    (layer,) = exported.layers
    ours = source.base_model.model.get_submodule(physical_path(source.base_model.model, layer.name))
    theirs = loaded.base_model.model.get_submodule(layer.name)
    ids = torch.arange(64)[None]
    with torch.no_grad():
        gap = (theirs(ids) - ours(ids)).norm(dim=-1)
    assert 0 < layer.relative < 1
    assert (gap <= layer.spectral * (1 + 1e-9) + 1e-12).all()
    # every row looked up once: the rows' errors make up the whole error matrix, ‖E‖_F = relative · ‖ΔW‖_F
    expected = torch.tensor(layer.relative * layer.norm, dtype=torch.float64)
    assert_close(gap.square().sum().sqrt(), expected, changed_from=torch.zeros((), dtype=torch.float64))


@pytest.mark.parametrize(("kind", "serving"), [("conv", "vllm"), ("embedding", "sglang"), ("embedding", "vllm")])
def test_servers_are_not_given_embeddings_or_convolutions(kind: str, serving: str, tmp_path: Path) -> None:
    make_base = ConvNet if kind == "conv" else tiny_llama
    sources = CONV_SOURCES if kind == "conv" else EMBEDDING_SOURCES
    source, names = _stacked(make_base(), sources["lora"], seed=1)
    before = {k: v.detach().clone() for k, v in source.state_dict().items()}
    with pytest.raises(ExportError, match=rf"linear projection layers only, not on .*\({kind}\)"):
        save_as_lora(tmp_path / "out", source, 8, names, serving=serving)
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    assert_identical(source.state_dict(), before)


def test_a_grouped_convolution_is_refused_by_name() -> None:
    net = ConvNet()
    net.conv1d = torch.nn.Conv1d(6, 5 * 2, 3, padding=1, groups=2)
    model = grafting.get_peft_model(net, grafting.LoHaConfig(r=2, target_modules=["conv1d"]))
    with pytest.raises(ExportError, match=r"conv1d \(Conv1d\)"):
        export_lora(model, 4)


def test_cli_exports_an_embedding_adapter_and_refuses_it_for_vllm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny_llama().save_pretrained(tmp_path / "base")
    source = grafting.get_peft_model(tiny_llama(), EMBEDDING_SOURCES["lora"][0]())
    randomize_adapters(source, seed=4)
    source.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    argv = ["export", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter")]
    assert cli_main([*argv, "--out", str(tmp_path / "served"), "--rank", "8", "--for", "vllm"]) == 1
    assert "not on model.embed_tokens (embedding)" in capsys.readouterr().err
    assert not (tmp_path / "served" / "adapter_config.json").exists()
    assert cli_main([*argv, "--out", str(tmp_path / "lora"), "--rank", "16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert max(layer["relative"] for layer in report["layers"]) < 1e-6  # rank 16: every layer's smaller side
    with torch.no_grad():
        expected = source(input_ids=IDS).logits
        with source.disable_adapter():
            base = source(input_ids=IDS).logits
        got = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora")(input_ids=IDS).logits
    assert_close(got, expected, changed_from=base, msg="the CLI's embedding export, loaded by PEFT")
