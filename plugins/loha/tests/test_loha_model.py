"""LoHa on whole models (Llama, BERT and a convolutional net): the invariants every method keeps."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from loha_helpers import base, hada_params, output, randomize, targets, train_output, weights_of

import grafting
from grafting import PeftModel, get_peft_model
from grafting.errors import UnsupportedLayerError
from grafting.model.layer import AdaptedLayer
from grafting.testing import assert_close, assert_identical
from grafting_loha import LoHaAdapter, LoHaConfig

ARCHS = ("llama", "bert", "conv")
#: float64 models against float64 formulas: rounding stays near 1e-15, a wrong delta is far above this
TIGHT = {"rtol": 1e-10, "atol": 1e-10}


@st.composite
def configs(draw: Any, arch: str, **fixed: Any) -> LoHaConfig:
    names = targets(arch)
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True))
    if arch == "bert" and set(chosen) <= {"query", "key"}:
        # tiny BERT's attention is near uniform: query/key deltas alone move the logits by ~1e-7, below
        # what a check can tell from rounding, so the draw always adapts a layer that matters too
        chosen.append("value")
    kwargs: dict[str, Any] = {
        "r": draw(st.integers(1, 4)),
        "alpha": draw(st.sampled_from([1.0, 2.5, 8.0])),
        "target_modules": chosen,
        "init_weights": False,
    }
    if arch == "conv":
        kwargs["use_effective_conv2d"] = draw(st.booleans())
    kwargs.update(fixed)
    return LoHaConfig(**kwargs)


def _model(arch: str, config: LoHaConfig, seed: int = 0) -> Any:
    model = get_peft_model(base(arch), config)
    randomize(model, seed)
    return model


@pytest.mark.parametrize("arch", ARCHS)
@given(data=st.data())
def test_disabled_adapter_gives_the_base_output(arch: str, data: st.DataObject) -> None:
    model = _model(arch, data.draw(configs(arch)))
    expected = output(base(arch), arch)
    adapted = output(model, arch)
    with model.disable_adapter():
        assert_close(output(model, arch), expected, changed_from=adapted, msg="disabled")
    assert_close(output(model, arch), adapted, changed_from=expected, msg="enabled again")


@pytest.mark.parametrize("arch", ARCHS)
@given(data=st.data())
def test_a_fresh_adapter_gives_the_base_output(arch: str, data: st.DataObject) -> None:
    model = get_peft_model(base(arch), data.draw(configs(arch, init_weights=True)))
    assert hada_params(model)
    fresh = output(model, arch)
    randomize(model, 0)  # the same adapter, no longer fresh, does move the output
    assert_close(fresh, output(base(arch), arch), changed_from=output(model, arch), msg="fresh adapter")


@pytest.mark.parametrize("arch", ARCHS)
@given(data=st.data())
def test_merging_keeps_the_output_and_unmerging_restores_the_weights(arch: str, data: st.DataObject) -> None:
    model = _model(arch, data.draw(configs(arch)))
    original = weights_of(base(arch))
    adapted = output(model, arch)
    plain = output(base(arch), arch)
    model.merge_adapter()
    assert_close(output(model, arch), adapted, changed_from=plain, **TIGHT, msg="merged")
    model.unmerge_adapter()
    assert_close(output(model, arch), adapted, changed_from=plain, **TIGHT, msg="unmerged")
    assert_close(weights_of(model.unload()), original, rtol=1e-12, atol=1e-12, msg="unmerged weights")


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_and_unload_gives_a_plain_model_with_the_adapted_output(arch: str) -> None:
    model = _model(arch, LoHaConfig(r=3, target_modules=targets(arch), init_weights=False))
    adapted = output(model, arch)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    assert_close(output(plain, arch), adapted, changed_from=output(base(arch), arch), **TIGHT, msg="merged")


@pytest.mark.parametrize("arch", ARCHS)
def test_unload_gives_back_the_untouched_base(arch: str) -> None:
    model = _model(arch, LoHaConfig(r=2, target_modules=targets(arch), init_weights=False))
    plain = model.unload()
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    assert_identical(weights_of(plain), weights_of(base(arch)), msg="unloaded weights")


@pytest.mark.parametrize("arch", ARCHS)
@given(data=st.data())
def test_save_then_load_is_bit_identical(arch: str, data: st.DataObject, tmp_path_factory) -> None:
    folder = tmp_path_factory.mktemp("loha")
    model = _model(arch, data.draw(configs(arch, rank_pattern={targets(arch)[0]: 2})))
    model.eval()
    model.save_pretrained(folder)
    loaded = PeftModel.from_pretrained(base(arch), folder)
    assert_identical(hada_params(loaded), hada_params(model), msg="reloaded factors")
    expected = output(model, arch)
    assert_close(output(loaded, arch), expected, changed_from=output(base(arch), arch), msg="reloaded output")


@pytest.mark.parametrize("arch", ARCHS)
def test_training_changes_adapter_parameters_only(arch: str) -> None:
    model = _model(arch, LoHaConfig(r=2, target_modules=targets(arch), init_weights=False))
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(hada_params(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    train_output(model, arch).backward()
    optimizer.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (name in trainable), f"{name} {'changed' if changed else 'did not change'}"


def test_a_fresh_adapter_trains_through_its_zero_factor_first() -> None:
    """hada_w2_b starts at zero, so the first step moves it (and only it) off zero."""
    model = get_peft_model(base("llama"), LoHaConfig(r=2, target_modules=["q_proj"]))
    train_output(model, "llama").backward()
    grads = {n.rsplit(".", 1)[-1]: p.grad for n, p in hada_params(model).items()}
    assert grads["hada_w2_b"].abs().max() > 0
    assert all(grads[k].abs().max() == 0 for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a"))


@pytest.mark.parametrize("arch", ARCHS)
def test_two_adapters_switch_stack_and_go_away(arch: str) -> None:
    names = targets(arch)
    model = _model(arch, LoHaConfig(r=2, target_modules=names, init_weights=False), seed=1)
    model.add_adapter("other", LoHaConfig(r=3, alpha=5, target_modules=names[:2], init_weights=False))
    randomize(model, 2, adapter="other")
    first = output(model, arch)
    model.set_adapter("other")
    second = output(model, arch)
    alone = get_peft_model(base(arch), LoHaConfig(r=3, alpha=5, target_modules=names[:2]))
    for name, p in hada_params(alone).items():
        p.data.copy_(hada_params(model, "other")[name.replace(".default.", ".other.")])
    assert_close(second, output(alone, arch), changed_from=first, msg="'other' alone")

    model.set_adapter(["default", "other"])  # both deltas add up on the layers they share
    layer = next(m for m in model.modules() if isinstance(m, AdaptedLayer) and len(m.adapters) == 2)
    x = torch.randn(2, *_input_shape(layer.base_layer), dtype=torch.float64)
    total = sum(_dense(layer.adapters[n], layer.base_layer, x) for n in ("default", "other"))
    with torch.no_grad():
        plain = layer.base_layer(x)
        assert_close(layer(x), plain + total, changed_from=plain, **TIGHT, msg="both deltas")

    model.delete_adapter("other")
    model.set_adapter("default")
    assert not hada_params(model, "other")
    assert_close(output(model, arch), first, changed_from=second, msg="'other' deleted")


def _input_shape(layer: torch.nn.Module) -> tuple[int, ...]:
    if isinstance(layer, torch.nn.Linear):
        return (layer.in_features,)
    if isinstance(layer, torch.nn.Conv1d):
        return (layer.in_channels, 9)
    return (layer.in_channels, 8, 8)


def _dense(adapter: LoHaAdapter, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    weight = adapter.delta_matrix().reshape(layer.weight.shape)
    if isinstance(layer, torch.nn.Linear):
        return torch.nn.functional.linear(x, weight)
    conv = torch.nn.functional.conv1d if isinstance(layer, torch.nn.Conv1d) else torch.nn.functional.conv2d
    return conv(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)


def test_rank_and_alpha_patterns_reach_each_layer() -> None:
    config = LoHaConfig(
        r=4,
        alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3},
    )
    model = get_peft_model(base("llama"), config)
    adapters = {n: m for n, m in model.named_modules() if isinstance(m, LoHaAdapter)}
    for name, adapter in adapters.items():
        expected_r = 2 if "v_proj" in name else 4
        expected_alpha = 3 if "layers.1.self_attn.q_proj" in name else 8
        assert adapter.r == expected_r, name
        assert adapter.hada_w1_a.shape[1] == expected_r, name
        assert adapter.scaling == expected_alpha / expected_r, name


def test_default_targets_follow_the_model_type() -> None:
    model = get_peft_model(base("llama"), LoHaConfig())
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}
    assert adapted == {"q_proj", "v_proj"}


def test_an_embedding_target_is_refused_and_the_model_left_as_it_was() -> None:
    model = get_peft_model(base("llama"), LoHaConfig(target_modules=["q_proj"]))
    before = {n for n, _ in model.named_modules()}
    with pytest.raises(UnsupportedLayerError, match="embed_tokens"):
        model.add_adapter("bad", LoHaConfig(target_modules=["v_proj", "embed_tokens"]))
    assert {n for n, _ in model.named_modules()} == before
    assert "bad" not in model.peft_config
    assert grafting.get_method("LOHA").config_class is LoHaConfig


def test_gpt2_conv1d_layers_are_refused_as_peft_refuses_them() -> None:
    from grafting.testing import tiny_gpt2

    with pytest.raises(UnsupportedLayerError, match="c_attn"):
        get_peft_model(tiny_gpt2(), LoHaConfig(target_modules=["c_attn"]))
