"""BOFT on whole models: the invariants every layer method keeps, merges, refusals, training."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from boft_helpers import TARGETS, base, boft_params, inputs, loss, output, randomize, weights_of
from hypothesis import given, settings
from hypothesis import strategies as st

import grafting
from grafting import ConfigError, MergeError, UnsupportedLayerError, get_peft_model
from grafting.model.layer import AdaptedLayer
from grafting.testing import assert_close, assert_identical, check_layer_adapter_invariants, tiny_gpt2
from grafting_boft import BOFTConfig

#: GPT-2: its one nn.Linear is lm_head, tied to wte in the tiny model (a merge would change both): the
#: invariants run on a GPT-2 with its own lm_head
MODELS = ("llama", "gpt2-untied", "bert", "t5")
MODEL_TARGETS = {**TARGETS, "gpt2-untied": ["lm_head"]}


@st.composite
def configs(draw: Any, arch: str) -> BOFTConfig:
    names = MODEL_TARGETS[arch]
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True))
    if arch == "bert":
        chosen.append("value")  # tiny BERT's attention is near uniform: query alone barely moves the logits
    factors = draw(st.integers(1, 3))
    by_size = draw(st.booleans())
    return BOFTConfig(
        target_modules=sorted(set(chosen)),
        boft_block_size=2 if by_size else 0,
        boft_block_num=0 if by_size else 4,
        boft_n_butterfly_factor=factors,
        init_weights=False,
    )


@pytest.mark.parametrize("arch", MODELS)
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_layer_adapter_invariants_hold(arch: str, data: st.DataObject, tmp_path_factory) -> None:
    model = get_peft_model(base(arch), data.draw(configs(arch)))
    randomize(model, data.draw(st.integers(0, 99)))
    check_layer_adapter_invariants(model, inputs(arch), lambda: base(arch), str(tmp_path_factory.mktemp("boft")))


@pytest.mark.parametrize("arch", [*MODELS, "conv"])
def test_a_fresh_adapter_gives_the_base_output_exactly(arch: str) -> None:
    targets = MODEL_TARGETS[arch] if arch != "conv" else ["pointwise"]
    model = get_peft_model(base(arch), BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2, target_modules=targets))
    assert boft_params(model)
    assert_identical(output(model, arch), output(base(arch), arch))


@pytest.mark.parametrize("arch", ["llama", "conv"])
def test_unmerge_gives_back_the_weights_bit_for_bit(arch: str) -> None:
    targets = TARGETS[arch] if arch != "conv" else ["spatial"]
    size = 3 if arch == "conv" else 4
    model = get_peft_model(base(arch), BOFTConfig(boft_block_size=size, target_modules=targets, init_weights=False))
    randomize(model, 3)
    adapted = output(model, arch)
    model.merge_adapter(safe_merge=True)
    assert_close(output(model, arch), adapted, changed_from=output(base(arch), arch), rtol=1e-10, atol=1e-10)
    model.unmerge_adapter()
    assert_identical(weights_of(model.unload()), weights_of(base(arch)))


def test_safe_merge_refuses_non_finite_weights_and_changes_nothing() -> None:
    model = get_peft_model(base("llama"), BOFTConfig(boft_block_size=4, target_modules=["q_proj"], init_weights=False))
    with torch.no_grad():
        next(p for n, p in boft_params(model).items() if n.endswith("boft_s"))[0, 0] = float("nan")
    before = weights_of(model)
    with pytest.raises(MergeError, match="non-finite"):
        model.merge_adapter(safe_merge=True)
    assert_identical(weights_of(model), before)


def test_training_changes_the_adapter_and_the_biases_it_names_only() -> None:
    model = get_peft_model(
        base("bert"), BOFTConfig(boft_block_size=4, target_modules=["query", "value"], bias="boft_only")
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    biases = {n for n in trainable if n.endswith("base_layer.bias")}
    assert trainable == set(boft_params(model)) | biases
    assert len(biases) == 4
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss(model.train(), "bert").backward()
    optimizer.step()
    for name, p in model.named_parameters():
        assert (not torch.equal(p, before[name])) == (name in trainable), name


def test_default_targets_and_refused_layers() -> None:
    model = get_peft_model(base("llama"), BOFTConfig(boft_block_size=4))
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}
    assert adapted == {"q_proj", "v_proj"}
    assert grafting.get_method("BOFT").config_class is BOFTConfig
    with pytest.raises(UnsupportedLayerError, match="c_attn"):
        get_peft_model(tiny_gpt2(), BOFTConfig(target_modules=["c_attn"]))  # GPT-2's Conv1D, as in PEFT
    before = {n for n, _ in model.named_modules()}
    with pytest.raises(ConfigError, match=r"down_proj: its 32 inputs are not divisible by boft_block_size 5"):
        model.add_adapter("bad", BOFTConfig(boft_block_size=5, target_modules=["down_proj"]))
    assert {n for n, _ in model.named_modules()} == before
    assert "bad" not in model.peft_config
