"""IA3 on tiny transformers models: the invariants every grafting method keeps."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from ia3_helpers import adapted_layers, base_weights, ia3_parameters, randomize

from grafting import AdaptedLayer, IA3Config, PeftModel, get_peft_model
from grafting.testing import model_output, sample_inputs, tiny_model

ARCHS = ("llama", "gpt2", "bert", "t5")
cases = given(arch=st.sampled_from(ARCHS), seed=st.integers(0, 2**16))

pytestmark = pytest.mark.filterwarnings("ignore::grafting.GraftingWarning")  # fan_in_fan_out on GPT-2's Conv1D


def ia3(arch: str, seed: int, **kwargs: object) -> tuple[PeftModel, torch.Tensor, dict]:
    """A randomized IA3 model on the default targets, the base model's logits, and the inputs."""
    inputs = sample_inputs(arch, seed=seed)
    model = tiny_model(arch, seed=seed)
    base = model_output(model, inputs)
    peft_model = get_peft_model(model, IA3Config(**kwargs))
    randomize(peft_model, seed)
    return peft_model, base, inputs


@cases
def test_initialized_adapter_is_the_base_model(arch: str, seed: int) -> None:
    inputs = sample_inputs(arch, seed=seed)
    model = tiny_model(arch, seed=seed)
    base = model_output(model, inputs)
    peft_model = get_peft_model(model, IA3Config())
    assert ia3_parameters(peft_model)
    assert torch.equal(model_output(peft_model, inputs), base)


@cases
def test_disabled_adapter_is_the_base_model(arch: str, seed: int) -> None:
    model, base, inputs = ia3(arch, seed)
    assert not torch.allclose(model_output(model, inputs), base)
    with model.disable_adapter():
        assert torch.equal(model_output(model, inputs), base)
    assert not torch.allclose(model_output(model, inputs), base)


@cases
def test_merged_equals_unmerged_and_unmerge_restores_the_base(arch: str, seed: int) -> None:
    model, base, inputs = ia3(arch, seed)
    original = base_weights(model.get_base_model())
    adapted = model_output(model, inputs)
    model.merge_adapter()
    torch.testing.assert_close(model_output(model, inputs), adapted, rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(model_output(model, inputs), base, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    restored = base_weights(model.get_base_model())
    assert restored.keys() == original.keys()
    for name, tensor in original.items():
        torch.testing.assert_close(restored[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    torch.testing.assert_close(model_output(model, inputs), adapted, rtol=1e-5, atol=1e-6)


@cases
def test_save_and_load_is_bit_identical(arch: str, seed: int, tmp_path_factory) -> None:
    folder = tmp_path_factory.mktemp("ia3")
    model, _, inputs = ia3(arch, seed)
    model.save_pretrained(folder)
    loaded = PeftModel.from_pretrained(tiny_model(arch, seed=seed), folder)
    ours, theirs = ia3_parameters(model), ia3_parameters(loaded)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(model_output(loaded, inputs), model_output(model, inputs))
    assert not any(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_training_changes_only_adapter_parameters(arch: str) -> None:
    model, _, inputs = ia3(arch, 1, init_ia3_weights=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(ia3_parameters(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(**inputs).logits.pow(2).mean().backward()
        optimizer.step()
    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert torch.equal(p, before[name]), f"{name} changed"


@pytest.mark.parametrize("arch", ARCHS)
def test_switching_between_adapters(arch: str) -> None:
    model, base, inputs = ia3(arch, 2)
    out_a = model_output(model, inputs)
    model.add_adapter("b", IA3Config())
    randomize(model, 7, adapter="b")
    assert model.active_adapters == ["default"]
    assert torch.equal(model_output(model, inputs), out_a)
    model.set_adapter("b")
    out_b = model_output(model, inputs)
    assert not torch.allclose(out_b, out_a)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(ia3_parameters(model, "b"))
    only_b = get_peft_model(tiny_model(arch, seed=2), IA3Config())
    values = {k.replace(".b.", ".default."): v for k, v in ia3_parameters(model, "b").items()}
    only_b.load_state_dict(values, strict=False)
    assert torch.equal(model_output(only_b, inputs), out_b)
    model.set_adapter("default")
    assert torch.equal(model_output(model, inputs), out_a)
    model.delete_adapter("default")
    assert torch.equal(model_output(model, inputs), out_b)
    with model.disable_adapter():
        assert torch.equal(model_output(model, inputs), base)


@pytest.mark.parametrize("arch", ARCHS)
def test_several_ia3_adapters_multiply(arch: str) -> None:
    model, _, inputs = ia3(arch, 3)
    model.add_adapter("b", IA3Config())
    randomize(model, 11, adapter="b")
    model.set_adapter(["default", "b"])
    both = model_output(model, inputs)
    product = get_peft_model(tiny_model(arch, seed=3), IA3Config())
    with torch.no_grad():
        a_values, b_values = ia3_parameters(model, "default"), ia3_parameters(model, "b")
        for name, p in ia3_parameters(product).items():
            p.copy_(a_values[name] * b_values[name.replace(".default.", ".b.")])
    torch.testing.assert_close(both, model_output(product, inputs))
    model.merge_adapter()
    torch.testing.assert_close(model_output(model, inputs), both, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model_output(model, inputs), both, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_and_unload_and_unload(arch: str) -> None:
    model, base, inputs = ia3(arch, 4)
    adapted = model_output(model, inputs)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, AdaptedLayer) for m in merged.modules())
    assert not any("ia3_l" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(model_output(merged, inputs), adapted, rtol=1e-5, atol=1e-5)

    model, base, inputs = ia3(arch, 4)
    plain = model.unload()
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    assert torch.equal(model_output(plain, inputs), base)


def test_per_sample_adapters_route_input_and_output_scaling() -> None:
    model, base, inputs = ia3("llama", 5)
    model.add_adapter("b", IA3Config())
    randomize(model, 13, adapter="b")
    out_a = model_output(model, inputs)
    model.set_adapter("b")
    out_b = model_output(model, inputs)
    with torch.no_grad():
        routed = model(**inputs, adapter_names=["b", "__base__"]).logits
    torch.testing.assert_close(routed[0], out_b[0])
    torch.testing.assert_close(routed[1], base[1])
    with torch.no_grad():
        routed = model(**inputs, adapter_names=["__base__", "default"]).logits
    torch.testing.assert_close(routed[1], out_a[1])


def test_exclude_modules_and_layers_to_transform() -> None:
    model = get_peft_model(
        tiny_model("llama"),
        IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"],
            feedforward_modules=["down_proj"],
            exclude_modules=["v_proj"],
            layers_to_transform=[1],
        ),
    )
    assert sorted(adapted_layers(model.get_base_model())) == [
        "model.layers.1.mlp.down_proj",
        "model.layers.1.self_attn.k_proj",
    ]


def test_modules_to_save_train_and_round_trip(tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_model("bert", seed=6), IA3Config(task_type="SEQ_CLS"))
    randomize(model, 6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier.modules_to_save.default" in n for n in trainable)
    head = model.get_base_model().classifier.modules_to_save["default"]
    with torch.no_grad():
        head.weight.add_(1.0)
    inputs = sample_inputs("bert", seed=6)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("bert", seed=6), tmp_path)
    assert torch.equal(model_output(loaded, inputs), model_output(model, inputs))
