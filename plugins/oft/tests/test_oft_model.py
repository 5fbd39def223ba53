"""OFT on whole models: the invariants every layer method keeps, merges, refusals, training."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oft_helpers import TARGETS, base, inputs, loss, oft_params, output, randomize, weights_of

import grafting
from grafting import MergeError, PeftModel, UnsupportedLayerError, get_peft_model
from grafting.model.layer import AdaptedLayer
from grafting.testing import assert_close, assert_identical, check_layer_adapter_invariants, tiny_gpt2
from grafting_oft import OFTConfig

#: GPT-2's linear layers are Conv1D (not in PEFT's OFT), its wpe sees one row of positions for the whole
#: batch (nothing to route per sample) and its tied lm_head shares wte's weight (a merge changes both):
#: the invariants run on a GPT-2 with its own lm_head, adapting lm_head and wte
MODELS = ("llama", "gpt2-untied", "bert", "t5")
MODEL_TARGETS = {**TARGETS, "gpt2-untied": ["wte", "lm_head"]}


@st.composite
def configs(draw: Any, arch: str, **fixed: Any) -> OFTConfig:
    names = MODEL_TARGETS[arch]
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True))
    if arch == "bert":
        chosen.append("value")  # tiny BERT's attention is near uniform: query alone barely moves the logits
    by_size = draw(st.booleans())
    kwargs: dict[str, Any] = {
        "target_modules": sorted(set(chosen)),
        "r": 0 if by_size else draw(st.sampled_from([1, 2, 4])),
        "oft_block_size": draw(st.sampled_from([2, 4, 8])) if by_size else 0,
        "block_share": draw(st.booleans()),
        "use_cayley_neumann": draw(st.booleans()),
        "num_cayley_neumann_terms": draw(st.integers(2, 6)),
        "coft": draw(st.booleans()),
        "eps": 0.5,
        "init_weights": False,
    }
    kwargs.update(fixed)
    return OFTConfig(**kwargs)


@pytest.mark.parametrize("arch", MODELS)
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_layer_adapter_invariants_hold(arch: str, data: st.DataObject, tmp_path_factory) -> None:
    config = data.draw(configs(arch))  # one Neumann term is the identity: the draw keeps two or more
    model = get_peft_model(base(arch), config)
    randomize(model, data.draw(st.integers(0, 99)))
    check_layer_adapter_invariants(
        model, inputs(arch), lambda: base(arch), str(tmp_path_factory.mktemp("oft")), adapter_name="default"
    )


@pytest.mark.parametrize("arch", [*MODELS, "conv"])
def test_a_fresh_adapter_gives_the_base_output_exactly(arch: str) -> None:
    model = get_peft_model(base(arch), OFTConfig(oft_block_size=2, target_modules=MODEL_TARGETS[arch]))
    assert oft_params(model)
    assert_identical(output(model, arch), output(base(arch), arch))


@pytest.mark.parametrize("arch", ["llama", "conv"])
def test_unmerge_gives_back_the_weights_bit_for_bit(arch: str) -> None:
    model = get_peft_model(
        base(arch), OFTConfig(oft_block_size=2, target_modules=MODEL_TARGETS[arch], init_weights=False)
    )
    randomize(model, 3)
    original = weights_of(base(arch))
    adapted = output(model, arch)
    model.merge_adapter()
    assert_close(output(model, arch), adapted, changed_from=output(base(arch), arch), rtol=1e-10, atol=1e-10)
    model.unmerge_adapter()
    assert_identical(weights_of(model.unload()), original)


def test_safe_merge_refuses_non_finite_weights_and_changes_nothing() -> None:
    model = get_peft_model(base("llama"), OFTConfig(oft_block_size=4, target_modules=["q_proj"], init_weights=False))
    randomize(model, 1)
    with torch.no_grad():
        next(iter(oft_params(model).values()))[0, 0] = float("inf")
    before = weights_of(model)
    with pytest.raises(MergeError, match="non-finite"):
        model.merge_adapter(safe_merge=True)
    assert_identical(weights_of(model), before)


def test_training_changes_the_rotations_and_the_biases_it_names_only() -> None:
    model = get_peft_model(
        base("llama"), OFTConfig(oft_block_size=4, target_modules=["q_proj", "down_proj"], init_weights=False)
    )
    bert = get_peft_model(base("bert"), OFTConfig(oft_block_size=4, target_modules=["query"], bias="oft_only"))
    assert {n for n, p in bert.named_parameters() if p.requires_grad} == {
        *oft_params(bert),
        *(f"base_model.model.bert.encoder.layer.{i}.attention.self.query.base_layer.bias" for i in (0, 1)),
    }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(oft_params(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss(model.train(), "llama").backward()
    optimizer.step()
    for name, p in model.named_parameters():
        assert (not torch.equal(p, before[name])) == (name in trainable), name


def test_a_rotation_trains_from_zero() -> None:
    """A fresh adapter is the identity, and the first step moves every block (the gradient at Q = 0 is not zero)."""
    model = get_peft_model(base("llama"), OFTConfig(oft_block_size=4, target_modules=["q_proj"]))
    loss(model, "llama").backward()
    for name, p in oft_params(model).items():
        assert p.grad is not None
        assert p.grad.abs().amax(1).min() > 0, name


def test_default_targets_follow_the_model_type() -> None:
    model = get_peft_model(base("llama"), OFTConfig(oft_block_size=4))
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}
    assert adapted == {"q_proj", "v_proj"}
    assert grafting.get_method("OFT").config_class is OFTConfig


def test_layers_peft_refuses_are_refused_and_the_model_left_as_it_was() -> None:
    with pytest.raises(UnsupportedLayerError, match="c_attn"):
        get_peft_model(tiny_gpt2(), OFTConfig(target_modules=["c_attn"]))  # GPT-2's Conv1D, as in PEFT
    model = get_peft_model(base("conv"), OFTConfig(oft_block_size=2, target_modules=["pointwise"]))
    model.base_model.model.extra = torch.nn.Conv2d(6, 6, 3, groups=2)
    before = {n for n, _ in model.named_modules()}
    with pytest.raises(UnsupportedLayerError, match=r"extra: .*groups=2"):
        model.add_adapter("bad", OFTConfig(oft_block_size=2, target_modules=["spatial", "extra"]))
    assert {n for n, _ in model.named_modules()} == before
    assert "bad" not in model.peft_config


def test_a_block_size_that_does_not_divide_is_moved_to_the_nearest_divisor_with_a_warning() -> None:
    with pytest.warns(grafting.GraftingWarning, match="oft_block_size 5 does not divide its 16 inputs; using 4"):
        model = get_peft_model(base("llama"), OFTConfig(oft_block_size=5, target_modules=["q_proj"]))
    assert {tuple(p.shape) for p in oft_params(model).values()} == {(4, 6)}


def test_save_load_keeps_the_rotations_bit_for_bit(tmp_path) -> None:
    model = get_peft_model(base("t5"), OFTConfig(r=2, oft_block_size=0, target_modules=["q", "wo"], init_weights=False))
    randomize(model, 5)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base("t5"), tmp_path)
    assert_identical(oft_params(loaded), oft_params(model))
