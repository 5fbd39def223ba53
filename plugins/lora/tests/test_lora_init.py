"""init_lora_weights = "pissa", "pissa_niter_N", "olora", "orthogonal": the same factors and residual
base weights as PEFT from the same seed, saved and loaded both ways, PEFT's conversion to plain LoRA,
merging, mixing, routing, and a failing add_adapter that leaves the model unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_option_helpers import assert_moves, assert_rows_route_alone, peft_config_of, weights_of
from safetensors.torch import load_file

from grafting import ConfigError, LoraConfig, PeftModel, UnsupportedLayerError, get_peft_model
from grafting.model.routing import BASE
from grafting.testing import assert_close, tiny_model

TARGETS = ["q_proj", "v_proj", "down_proj"]
INITS = ["pissa", "pissa_niter_3", "olora", "orthogonal"]
RESIDUAL = ("pissa", "pissa_niter_3", "olora")
#: float32 models, as PEFT needs for these initializations; tolerances are float32's defaults.


def ids(batch: int = 3) -> torch.Tensor:
    return torch.randint(0, 64, (batch, 7), generator=torch.Generator().manual_seed(1))


def logits(model: Any, batch: int = 3, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids(batch), **kwargs).logits


def config(init: str, **kwargs: Any) -> LoraConfig:
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": init, **kwargs})


def seeded(build: Any, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return build()


@torch.no_grad()
def train(model: Any, seed: int) -> None:
    """Stand-in for training: seeded changes to every LoRA factor, in name order (PEFT's and ours agree)."""
    gen = torch.Generator().manual_seed(seed)
    named = sorted(
        (
            (n.replace(".adapters.default", "").replace(".default", ""), p)
            for n, p in model.named_parameters()
            if "lora_" in n
        )
    )
    for _, p in named:
        p.add_(torch.randn(p.shape, generator=gen) * 0.2)


def both(cfg: LoraConfig, seed: int = 0) -> tuple[Any, Any]:
    ours = seeded(lambda: get_peft_model(tiny_model("llama"), cfg), seed)
    theirs = seeded(lambda: peft.get_peft_model(tiny_model("llama"), peft_config_of(cfg)), seed)
    return ours, theirs


def assert_same_model(ours: Any, theirs: Any) -> None:
    mine = {k.replace(".adapters.default", ""): v for k, v in ours.state_dict().items()}
    for key, value in theirs.state_dict().items():
        key = key.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
        assert_close(mine[key], value, msg=key)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("dora", [False, True])
def test_same_factors_and_residual_as_peft_from_one_seed(init: str, dora: bool) -> None:
    ours, theirs = both(config(init, use_dora=dora))
    assert_same_model(ours, theirs)
    original = tiny_model("llama")
    assert_close(logits(ours), logits(original), rtol=1e-4, atol=1e-5)  # starts as the base model
    weight = ours.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    if init in RESIDUAL:  # the base holds the residual W − s·B·A
        assert_moves(weight, original.model.layers[0].self_attn.q_proj.weight, "residual weight")
    else:
        assert torch.equal(weight, original.model.layers[0].self_attn.q_proj.weight)
    adapter = ours.base_model.model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert adapter.lora_A.weight.abs().max() > 1e-3
    assert adapter.lora_B.weight.abs().max() > 1e-3


@pytest.mark.parametrize("init", INITS)
def test_trained_adapters_load_both_ways(init: str, tmp_path: Path) -> None:
    """A loaded adapter re-creates the residual from the original base, in either library."""
    ours, theirs = both(config(init))
    train(ours, 1)
    train(theirs, 1)
    expected = logits(ours)
    assert_moves(expected, logits(tiny_model("llama")))
    assert_close(logits(theirs), expected)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    if init != "pissa_niter_3":  # deterministic: loading recomputes the same residual (orthogonal: none)
        assert_close(logits(PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "theirs")), expected)
        loaded = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ours")
        assert_close(logits(loaded), expected)


@settings(max_examples=4, deadline=None)
@given(
    init=st.sampled_from(["pissa", "olora", "pissa_niter_3"]),  # the randomized SVD: saved converted
    r=st.sampled_from([2, 4]),
    rslora=st.booleans(),
    pattern=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_conversion_to_plain_lora_as_peft(
    init: str, r: int, rslora: bool, pattern: bool, seed: int, tmp_path_factory: Any
) -> None:
    """Trained PiSSA/OLoRA saved against its initial state: plain LoRA on the original weights, PEFT's tensors."""
    folder = tmp_path_factory.mktemp("convert")
    options: dict[str, Any] = {"r": r, "use_rslora": rslora}
    if pattern and not rslora:
        options |= {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3}}
    ours, theirs = both(config(init, **options), seed)
    for model, name in ((ours, "ours"), (theirs, "theirs")):
        model.peft_config["default"].init_lora_weights = True if name == "theirs" else init
        model.save_pretrained(folder / f"{name}_init")
        train(model, seed)
    trained = logits(ours)
    ours.save_pretrained(folder / "ours", path_initial_model_for_weight_conversion=folder / "ours_init")
    theirs.save_pretrained(folder / "theirs", path_initial_model_for_weight_conversion=str(folder / "theirs_init"))

    mine, reference = (
        load_file(folder / "ours/adapter_model.safetensors"),
        load_file(folder / "theirs/adapter_model.safetensors"),
    )
    assert mine.keys() == reference.keys()
    for key, value in reference.items():
        assert_close(mine[key], value, msg=key)
    plain = peft.PeftModel.from_pretrained(tiny_model("llama"), folder / "ours")  # onto the *original* model
    assert plain.peft_config["default"].init_lora_weights is True
    assert plain.peft_config["default"].r == 2 * r
    assert_close(logits(plain), trained, rtol=1e-4, atol=1e-5)
    assert_close(
        logits(PeftModel.from_pretrained(tiny_model("llama"), folder / "theirs")), trained, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("init", INITS)
def test_merge_mix_and_per_sample(init: str) -> None:
    model = seeded(lambda: get_peft_model(tiny_model("llama").double(), config(init)))
    model.add_adapter("other", LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False))
    train(model, 2)
    model.base_model.set_adapter(["default", "other"])
    expected = logits(model)
    residual = weights_of(model.base_model.model)
    model.merge_adapter()
    assert_close(logits(model), expected, rtol=1e-9, atol=1e-9)
    model.unmerge_adapter()
    for key, value in weights_of(model.base_model.model).items():
        assert_close(value, residual[key], rtol=1e-9, atol=1e-9, msg=key)

    assert_rows_route_alone(model, ids(), ["other", BASE, "default"], rtol=1e-9, atol=1e-9)


def test_a_failing_add_adapter_leaves_the_base_weights_alone() -> None:
    model = tiny_model("llama")
    before = weights_of(model)
    with pytest.raises(UnsupportedLayerError):  # q_proj is decomposed first, then the norm layer is refused
        get_peft_model(model, config("pissa", target_modules=["q_proj", "input_layernorm"]))
    assert all(torch.equal(v, before[k]) for k, v in weights_of(model).items())


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="even rank"):
        get_peft_model(tiny_model("llama"), config("orthogonal", r=3))
    for name in ("lora_ga", "mica", "pissa_niter_x", "PiSSA"):
        with pytest.raises(ConfigError, match="init_lora_weights"):
            config(name)
    model = get_peft_model(tiny_model("llama"), config("pissa", use_dora=True))
    model.save_pretrained(tmp_path / "init")
    with pytest.raises(ConfigError, match="DoRA"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")
    assert not (tmp_path / "out").exists()  # refused before anything is written
