"""IA3 on tiny transformers models: the invariants every grafting method keeps."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from ia3_helpers import adapted_layers, base_weights, ia3_parameters, randomize

from grafting import AdaptedLayer, IA3Config, PeftModel, get_peft_model
from grafting.testing import assert_close, assert_identical, model_output, sample_inputs, tiny_model

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
    fresh = model_output(peft_model, inputs)
    randomize(peft_model, seed)  # the same adapter, no longer at its initial ones, does move the output
    assert_close(fresh, base, changed_from=model_output(peft_model, inputs), msg="initialized adapter")


@cases
def test_disabled_adapter_is_the_base_model(arch: str, seed: int) -> None:
    model, base, inputs = ia3(arch, seed)
    adapted = model_output(model, inputs)
    with model.disable_adapter():
        assert_close(model_output(model, inputs), base, changed_from=adapted, msg="disabled")
    assert_close(model_output(model, inputs), adapted, changed_from=base, msg="enabled again")


@cases
def test_merged_equals_unmerged_and_unmerge_restores_the_base(arch: str, seed: int) -> None:
    model, base, inputs = ia3(arch, seed)
    original = base_weights(model.get_base_model())
    adapted = model_output(model, inputs)
    model.merge_adapter()
    assert_close(model_output(model, inputs), adapted, changed_from=base, msg="merged")
    with model.disable_adapter():
        assert_close(model_output(model, inputs), base, changed_from=adapted, msg="disabled while merged")
    model.unmerge_adapter()
    assert_close(base_weights(model.get_base_model()), original, msg="unmerged weights")  # W * l / l rounds
    assert_close(model_output(model, inputs), adapted, changed_from=base, msg="unmerged")


@cases
def test_save_and_load_is_bit_identical(arch: str, seed: int, tmp_path_factory) -> None:
    folder = tmp_path_factory.mktemp("ia3")
    model, base, inputs = ia3(arch, seed)
    model.save_pretrained(folder)
    loaded = PeftModel.from_pretrained(tiny_model(arch, seed=seed), folder)
    assert_identical(ia3_parameters(loaded), ia3_parameters(model), msg="reloaded ia3_l")
    assert_close(model_output(loaded, inputs), model_output(model, inputs), changed_from=base, msg="reloaded")
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
            assert_identical(p, before[name], msg=f"{name} changed")


@pytest.mark.parametrize("arch", ARCHS)
def test_switching_between_adapters(arch: str) -> None:
    model, base, inputs = ia3(arch, 2)
    out_a = model_output(model, inputs)
    model.add_adapter("b", IA3Config())
    randomize(model, 7, adapter="b")
    assert model.active_adapters == ["default"]
    assert_close(model_output(model, inputs), out_a, changed_from=base, msg="b added, not active")
    model.set_adapter("b")
    out_b = model_output(model, inputs)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(ia3_parameters(model, "b"))
    only_b = get_peft_model(tiny_model(arch, seed=2), IA3Config())
    values = {k.replace(".b.", ".default."): v for k, v in ia3_parameters(model, "b").items()}
    only_b.load_state_dict(values, strict=False)
    assert_close(model_output(only_b, inputs), out_b, changed_from=out_a, msg="b alone")
    model.set_adapter("default")
    assert_close(model_output(model, inputs), out_a, changed_from=out_b, msg="back to default")
    model.delete_adapter("default")
    assert_close(model_output(model, inputs), out_b, changed_from=out_a, msg="default deleted")
    with model.disable_adapter():
        assert_close(model_output(model, inputs), base, changed_from=out_b, msg="disabled")


@pytest.mark.parametrize("arch", ARCHS)
def test_several_ia3_adapters_multiply(arch: str) -> None:
    model, base, inputs = ia3(arch, 3)
    only_default = model_output(model, inputs)
    model.add_adapter("b", IA3Config())
    randomize(model, 11, adapter="b")
    model.set_adapter(["default", "b"])
    both = model_output(model, inputs)
    product = get_peft_model(tiny_model(arch, seed=3), IA3Config())
    with torch.no_grad():
        a_values, b_values = ia3_parameters(model, "default"), ia3_parameters(model, "b")
        for name, p in ia3_parameters(product).items():
            p.copy_(a_values[name] * b_values[name.replace(".default.", ".b.")])
    assert_close(both, model_output(product, inputs), changed_from=only_default, msg="the product of both")
    model.merge_adapter()
    assert_close(model_output(model, inputs), both, changed_from=base, msg="both merged")
    model.unmerge_adapter()
    assert_close(model_output(model, inputs), both, changed_from=base, msg="both unmerged")


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_and_unload_and_unload(arch: str) -> None:
    model, base, inputs = ia3(arch, 4)
    adapted = model_output(model, inputs)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, AdaptedLayer) for m in merged.modules())
    assert not any("ia3_l" in n for n, _ in merged.named_parameters())
    assert_close(model_output(merged, inputs), adapted, changed_from=base, msg="merged and unloaded")

    model, base, inputs = ia3(arch, 4)
    plain = model.unload()
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    assert_close(model_output(plain, inputs), base, changed_from=adapted, msg="unloaded")


def test_per_sample_adapters_route_input_and_output_scaling() -> None:
    model, base, inputs = ia3("llama", 5)
    model.add_adapter("b", IA3Config())
    randomize(model, 13, adapter="b")
    out_a = model_output(model, inputs)
    model.set_adapter("b")
    out_b = model_output(model, inputs)
    with torch.no_grad():
        routed = model(**inputs, adapter_names=["b", "__base__"]).logits
    assert_close(routed[0], out_b[0], changed_from=out_a[0], msg="sample 0 through b")
    assert_close(routed[1], base[1], changed_from=out_b[1], msg="sample 1 through the base")
    with torch.no_grad():
        routed = model(**inputs, adapter_names=["__base__", "default"]).logits
    assert_close(routed[0], base[0], changed_from=out_a[0], msg="sample 0 through the base")
    assert_close(routed[1], out_a[1], changed_from=out_b[1], msg="sample 1 through default")


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
    base = model_output(tiny_model("bert", seed=6), inputs)
    assert_close(model_output(loaded, inputs), model_output(model, inputs), changed_from=base, msg="reloaded")
