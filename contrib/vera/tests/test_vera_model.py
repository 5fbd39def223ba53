"""VeRA on the invariants every grafting layer method has, and what is particular to it."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import grafting
from grafting import AdapterLoadError, ConfigError, LoraConfig, PeftModel, VeraConfig, get_peft_model
from grafting.testing import (
    ARCHITECTURES,
    assert_close,
    check_layer_adapter_invariants,
    model_output,
    randomize_adapters,
    sample_inputs,
    tiny_model,
)

pytestmark = pytest.mark.filterwarnings("ignore::grafting.GraftingWarning")  # fan_in_fan_out on GPT-2's Conv1D

TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "value", "dense"],
    "t5": ["q", "v", "wi", "wo"],
}


@settings(max_examples=3, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_vera_has_the_invariants_of_every_layer_method(arch: str, data: st.DataObject, tmp_path_factory) -> None:
    seed = data.draw(st.integers(0, 2**16), label="seed")
    config = VeraConfig(
        r=data.draw(st.integers(1, 12), label="r"),
        projection_prng_key=data.draw(st.integers(0, 2**31), label="key"),
        save_projection=data.draw(st.booleans(), label="save_projection"),
        target_modules=data.draw(st.lists(st.sampled_from(TARGETS[arch]), min_size=1, unique=True), label="targets"),
    )

    def rebuild() -> torch.nn.Module:
        return tiny_model(arch, seed=seed).double()

    model = get_peft_model(rebuild(), config)
    randomize_adapters(model, seed=seed, scale=1.0)
    folder = str(tmp_path_factory.mktemp("vera"))
    check_layer_adapter_invariants(model, sample_inputs(arch, batch=3, seed=seed), rebuild, folder)


def test_only_the_vectors_train_and_the_projections_stay(tmp_path) -> None:
    model = get_peft_model(tiny_model("llama"), VeraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    trainable = sorted(n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad)
    assert set(trainable) == {"vera_lambda_b", "vera_lambda_d"}
    shared = model.base_model.shared_states["default"]
    before = shared.vera_A.clone(), shared.vera_B.clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batch = sample_inputs("llama")
    model.train()
    for _ in range(2):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(shared.vera_A, before[0])
    assert torch.equal(shared.vera_B, before[1])
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("vera_lambda_b"))


def test_the_projections_are_as_large_as_the_largest_target() -> None:
    model = get_peft_model(
        tiny_model("llama", hidden=16), VeraConfig(r=5, target_modules=["q_proj", "up_proj", "down_proj"])
    )
    shared = model.base_model.shared_states["default"]
    assert tuple(shared.vera_A.shape) == (5, 32)  # down_proj reads 32 features
    assert tuple(shared.vera_B.shape) == (32, 5)  # up_proj writes 32


def test_mixed_with_lora_on_one_layer_and_routed_per_sample(tmp_path) -> None:
    base = tiny_model("llama").double()
    model = get_peft_model(base, VeraConfig(r=4, target_modules=["q_proj", "v_proj"]), adapter_name="vera", mixed=True)
    model.add_adapter("lora", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    randomize_adapters(model, seed=1, scale=1.0)
    inputs = sample_inputs("llama", batch=3)
    model.set_adapter(["vera", "lora"])
    both = model_output(model, inputs)
    model.set_adapter("vera")
    vera = model_output(model, inputs)
    model.set_adapter("lora")
    lora = model_output(model, inputs)
    with model.disable_adapter():
        plain = model_output(model, inputs)
    assert_close(vera, vera, changed_from=plain)
    assert_close(lora, lora, changed_from=vera)
    routed = model_output(model, {**inputs, "adapter_names": ["vera", "lora", "__base__"]})
    assert_close(routed, torch.stack([vera[0], lora[1], plain[2]]))
    model.set_adapter(["vera", "lora"])
    model.merge_adapter()
    assert_close(model_output(model, inputs), both, rtol=1e-9, atol=1e-9)
    model.unmerge_adapter()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama").double(), tmp_path, mixed=True)
    assert_close(model_output(loaded, inputs), both)


def test_a_file_without_the_projections_does_not_load_into_save_projection_true(tmp_path) -> None:
    model = get_peft_model(tiny_model("llama"), VeraConfig(r=4, target_modules=["q_proj"], save_projection=False))
    model.save_pretrained(tmp_path)
    config = VeraConfig(r=4, target_modules=["q_proj"], save_projection=True)
    with pytest.raises(AdapterLoadError, match=r"base_model\.vera_A"):
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path, config=config)


def test_config_checks_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"VeraConfig\.r"):
        VeraConfig(r=0)
    with pytest.raises(ConfigError, match=r"VeraConfig\.projection_prng_key"):
        VeraConfig(projection_prng_key=-1)
    with pytest.raises(ConfigError, match=r"VeraConfig\.bias"):
        VeraConfig(bias="lora_only")
    with pytest.raises(ConfigError, match=r"VeraConfig\.save_projection"):
        VeraConfig(save_projection="yes")


def test_bias_vera_only_trains_the_adapted_layers_biases() -> None:
    model = get_peft_model(tiny_model("bert"), VeraConfig(r=4, target_modules=["query"], bias="vera_only"))
    biases = sorted(n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias"))
    assert biases
    assert all("query.base_layer.bias" in n for n in biases)


def test_inspect_checks_the_shared_shapes(tmp_path) -> None:
    get_peft_model(tiny_model("llama"), VeraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    info = grafting.inspect_adapter(tmp_path)  # the public inspection API
    assert info["check"]["ok"]
    assert info["check"]["shapes_checked"]
    assert info["shared"] == ["base_model.vera_A", "base_model.vera_B"]
    config = grafting.VeraConfig.from_pretrained(tmp_path)
    assert config.r == 4
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**saved, "r": 5}))  # the file now contradicts r
    problems = grafting.inspect_adapter(tmp_path)["check"]["problems"]
    assert any("r=5" in p for p in problems)
