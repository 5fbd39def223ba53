"""IA3 on each supported base layer: forward, merge/unmerge, PEFT's shapes and outputs."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from ia3_helpers import Holder, randomize
from torch import nn
from transformers.pytorch_utils import Conv1D

from grafting import (
    GraftingWarning,
    IA3Config,
    MergeError,
    UnsupportedLayerError,
    get_peft_model,
    get_peft_model_state_dict,
)
from grafting.testing import assert_close, assert_identical
from grafting_ia3.layers import IA3Input, IA3Output

KINDS = ("linear", "conv1d_hf", "conv2d", "conv3d")


def make_layer(kind: str, bias: bool, seed: int) -> tuple[nn.Module, torch.Tensor, int]:
    """A seeded base layer, an input for it, and its number of spatial dimensions."""
    torch.manual_seed(seed)
    if kind == "linear":
        layer, x, spatial = nn.Linear(5, 7, bias=bias), torch.randn(2, 3, 5), 0
    elif kind == "conv1d_hf":
        layer, x, spatial = Conv1D(7, 5), torch.randn(2, 3, 5), 0
        nn.init.normal_(layer.weight)
    elif kind == "conv2d":
        layer, x, spatial = nn.Conv2d(6, 4, 3, padding=1, groups=2, bias=bias), torch.randn(2, 6, 5, 5), 2
    else:
        layer, x, spatial = nn.Conv3d(3, 4, 2, bias=bias), torch.randn(2, 3, 3, 3, 3), 3
    if getattr(layer, "bias", None) is not None:
        nn.init.normal_(layer.bias)
    return layer.eval(), x, spatial


def config(kind: str, feedforward: bool, **kwargs: object) -> IA3Config:
    return IA3Config(
        target_modules=["layer"],
        feedforward_modules=["layer"] if feedforward else [],
        fan_in_fan_out=kind == "conv1d_hf",
        **kwargs,
    )


def adapted(kind: str, bias: bool, feedforward: bool, seed: int):
    layer, x, spatial = make_layer(kind, bias, seed)
    original = copy.deepcopy(layer)
    model = get_peft_model(Holder(layer), config(kind, feedforward))
    randomize(model, seed)
    return model, original, x, spatial


def vector_of(model) -> torch.Tensor:
    return model.base_model.model.layer.adapters["default"].ia3_l.detach().reshape(-1)


layer_cases = given(
    kind=st.sampled_from(KINDS), bias=st.booleans(), feedforward=st.booleans(), seed=st.integers(0, 2**16)
)


@layer_cases
def test_forward_is_the_documented_scaling(kind: str, bias: bool, feedforward: bool, seed: int) -> None:
    model, original, x, spatial = adapted(kind, bias, feedforward, seed)
    scale = vector_of(model).reshape((-1,) + (1,) * spatial)
    with torch.no_grad():
        expected = original(x * scale) if feedforward else original(x) * scale
        got = model(x)
        assert_close(got, expected, changed_from=original(x), msg="scaled forward")
    adapter = model.base_model.model.layer.adapters["default"]
    assert isinstance(adapter, IA3Input if feedforward else IA3Output)


@layer_cases
def test_merge_keeps_the_output_and_unmerge_restores_the_weights(
    kind: str, bias: bool, feedforward: bool, seed: int
) -> None:
    model, original, x, _ = adapted(kind, bias, feedforward, seed)
    with torch.no_grad():
        before = model(x)
        model.merge_adapter()
        merged = model(x)
    base = model.base_model.model.layer.base_layer
    assert_close(merged, before, changed_from=original(x).detach(), msg="merged")
    if feedforward and getattr(original, "bias", None) is not None:
        assert_identical(base.bias, original.bias, msg="bias")  # input scaling leaves the bias alone
    merged_weight = base.weight.detach().clone()
    model.unmerge_adapter()
    # W * l / l rounds; the merged weight, 0.5 to 1.5 times W, is far outside that tolerance
    assert_close(dict(base.state_dict()), dict(original.state_dict()), msg="unmerged weights")
    assert_close(base.weight, original.weight, changed_from=merged_weight, msg="unmerged weight")
    with torch.no_grad():
        assert_close(model(x), before, changed_from=original(x), msg="unmerged")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("feedforward", [False, True])
def test_same_keys_shapes_and_outputs_as_peft(kind: str, feedforward: bool) -> None:
    layer, x, _ = make_layer(kind, True, 3)
    ours = get_peft_model(Holder(copy.deepcopy(layer)), config(kind, feedforward))
    randomize(ours, 3)
    theirs = peft.get_peft_model(
        Holder(copy.deepcopy(layer)),
        peft.IA3Config(
            target_modules=["layer"],
            feedforward_modules=["layer"] if feedforward else [],
            fan_in_fan_out=kind == "conv1d_hf",
        ),
    )
    state = get_peft_model_state_dict(ours)
    reference = peft.get_peft_model_state_dict(theirs)
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    result = peft.set_peft_model_state_dict(theirs, state)
    assert not result.unexpected_keys
    with torch.no_grad():
        assert_close(ours(x), theirs(x), changed_from=layer(x), msg="PEFT's output")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("feedforward", [False, True])
def test_unmerge_refuses_a_vector_entry_at_zero(kind: str, feedforward: bool) -> None:
    model, _, x, _ = adapted(kind, True, feedforward, 5)
    with torch.no_grad():
        model.base_model.model.layer.adapters["default"].ia3_l.view(-1)[1] = 0.0
        before = model(x)
    with pytest.warns(GraftingWarning, match="cannot be unmerged"):
        model.merge_adapter()
    base = model.base_model.model.layer.base_layer
    merged_state = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad():
        assert_close(model(x), before, msg="merged")
    with pytest.raises(MergeError, match=r"layer \(IA3 adapter 'default'\): cannot unmerge: 1 entries"):
        model.unmerge_adapter()
    assert_identical(dict(base.state_dict()), merged_state, msg="after the refused unmerge")
    assert all(torch.isfinite(tensor).all() for tensor in merged_state.values())
    assert model.base_model.model.layer.merged == ["default"]
    with pytest.raises(MergeError), model.disable_adapter():
        pass
    with torch.no_grad():
        assert_close(model(x), before, msg="still merged")


@pytest.mark.parametrize(("dtype", "refused"), [(torch.float32, False), (torch.float16, True)])
def test_near_zero_depends_on_the_weight_dtype(dtype: torch.dtype, refused: bool) -> None:
    """1e-4 is far from zero for a float32 weight, but scales a float16 weight out of its normal range."""
    torch.manual_seed(0)
    base = nn.Linear(6, 4).to(dtype)
    original = base.weight.detach().clone()
    adapter = IA3Output(base, init=True)
    with torch.no_grad():
        adapter.ia3_l[2] = 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GraftingWarning)
        adapter.merge(base)
    if refused:
        with pytest.raises(MergeError, match="within"):
            adapter.unmerge(base)
    else:
        adapter.unmerge(base)
        assert_close(base.weight, original, msg="unmerged weight")


def test_unsupported_layer_is_refused_and_the_model_is_unchanged() -> None:
    model = nn.ModuleDict({"lin": nn.Linear(4, 4), "emb": nn.Embedding(10, 4)})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedLayerError, match=r"emb is a Embedding"):
        get_peft_model(model, IA3Config(target_modules=["lin", "emb"], feedforward_modules=[]))
    assert isinstance(model["lin"], nn.Linear)
    assert isinstance(model["emb"], nn.Embedding)
    assert_identical(dict(model.state_dict()), before, msg="after the refused get_peft_model")


def test_unbatched_conv_input() -> None:
    layer, x, _ = make_layer("conv2d", True, 1)
    for feedforward in (False, True):
        model = get_peft_model(Holder(copy.deepcopy(layer)), config("conv2d", feedforward))
        randomize(model, 1)
        with torch.no_grad():
            assert_close(model(x[0]), model(x)[0], changed_from=layer(x[0]), msg="unbatched")
