"""DoRA on convolutions and embeddings: PEFT loads what grafting saves and the other way round,
merging keeps the output, mixing and per-sample routing work, over random small configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_option_helpers import TOL, assert_moves, peft_config_of, randomize, run, weights_of, zoo, zoo_ids
from torch import nn

from grafting import ConfigError, LoraConfig, MergeError, PeftModel, get_peft_model
from grafting.model.routing import BASE
from grafting.testing import assert_close, assert_identical
from grafting_lora.dora import DoraConv, DoraEmbedding

TARGETS = ["emb", "conv1", "conv2", "conv3"]


@st.composite
def dora_configs(draw: Any) -> LoraConfig:
    targets = draw(st.lists(st.sampled_from(TARGETS), min_size=1, max_size=4, unique=True))
    return LoraConfig(
        r=draw(st.integers(1, 4)),
        lora_alpha=draw(st.sampled_from([1, 2, 5, 8])),
        use_rslora=draw(st.booleans()),
        use_dora=True,
        target_modules=sorted(targets),
    )


def test_dora_builds_conv_and_embedding_adapters_with_peft_shapes() -> None:
    model = get_peft_model(zoo(), LoraConfig(r=2, target_modules=TARGETS, use_dora=True))
    layers = model.base_model.model
    assert isinstance(layers.emb.adapters["default"], DoraEmbedding)
    assert all(isinstance(getattr(layers, c).adapters["default"], DoraConv) for c in TARGETS[1:])
    shapes = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(_peft(zoo(), model)).items()}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if "magnitude" in k}
    assert sorted(ours.values()) == sorted(v for k, v in shapes.items() if "magnitude" in k)
    assert ours["base_model.model.conv2.adapters.default.lora_magnitude_vector"] == (1, 4, 1, 1)
    assert ours["base_model.model.emb.adapters.default.lora_magnitude_vector"] == (6,)
    # created as the identity: the initial magnitude is the weight's own norm
    assert_close(run(model), run(zoo()), **TOL)


def _peft(base: torch.nn.Module, ours: Any) -> Any:
    return peft.get_peft_model(base, peft_config_of(ours.peft_config["default"]))


@settings(max_examples=6, deadline=None)
@given(config=dora_configs(), seed=st.integers(0, 2**16))
def test_grafting_saves_peft_loads_and_back(config: LoraConfig, seed: int, tmp_path_factory: Any) -> None:
    folder = tmp_path_factory.mktemp("dora")
    ours = get_peft_model(zoo(), config)
    randomize(ours, seed)
    expected = run(ours)
    assert_moves(expected, run(zoo()))
    ours.save_pretrained(folder)

    theirs = peft.PeftModel.from_pretrained(zoo(), folder)
    assert_close(run(theirs), expected, **TOL)
    randomize(theirs, seed + 1)
    theirs.save_pretrained(folder / "peft")
    back = PeftModel.from_pretrained(zoo(), folder / "peft")
    assert_close(run(back), run(theirs), **TOL)
    merged_ours, merged_theirs = weights_of(back.merge_and_unload()), weights_of(theirs.merge_and_unload())
    for key, value in merged_theirs.items():
        assert_close(merged_ours[key], value, **TOL, msg=key)


@settings(max_examples=6, deadline=None)
@given(config=dora_configs(), seed=st.integers(0, 2**16))
def test_merge_keeps_the_output_and_unmerge_restores_the_weights(config: LoraConfig, seed: int) -> None:
    model = get_peft_model(zoo(), config)
    randomize(model, seed)
    before = weights_of(zoo())
    expected = run(model)
    model.merge_adapter()
    assert_close(run(model), expected, **TOL)
    model.unmerge_adapter()
    assert_close(run(model), expected, **TOL)
    for key, value in weights_of(model.base_model.model).items():
        if ".adapters." not in key:
            assert_close(value, before[key.replace(".base_layer", "")], **TOL, msg=key)


def test_with_another_adapter_on_the_same_layers_and_per_sample(tmp_path: Path) -> None:
    """DoRA plus a plain LoRA adapter on the same layers: both active equals PEFT's; routing equals each alone."""
    ours = get_peft_model(zoo(), LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, use_dora=True))
    ours.add_adapter("other", LoraConfig(r=3, target_modules=TARGETS))
    randomize(ours, 5)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(zoo(), tmp_path)
    theirs.load_adapter(tmp_path / "other", adapter_name="other")
    theirs.base_model.set_adapter(["default", "other"])
    ours.base_model.set_adapter(["default", "other"])
    both = run(ours)
    assert_close(both, run(theirs), **TOL)
    ours.merge_adapter(["default", "other"])  # DoRA reads the base weight: the core merges it first
    assert_close(run(ours), both, **TOL)
    ours.unmerge_adapter()

    names = ["other", BASE, "default"]
    ids = zoo_ids(3, seed=7)
    routed = run(ours, ids, adapter_names=names)
    for i, name in enumerate(names):
        if name == BASE:
            with ours.disable_adapter():
                alone = run(ours, ids[i : i + 1])
        else:
            ours.set_adapter(name)
            alone = run(ours, ids[i : i + 1])
        assert_close(routed[i : i + 1], alone, **TOL)


@pytest.mark.parametrize("target", ["conv1", "conv2", "conv3"])
def test_training_with_dropout_draws_and_gradients_as_peft(target: str) -> None:
    config = LoraConfig(r=2, target_modules=[target], use_dora=True, lora_dropout=0.3)
    ours, theirs = get_peft_model(zoo(), config), peft.get_peft_model(zoo(), peft_config_of(config))
    randomize(ours, 3)
    randomize(theirs, 3)
    losses = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(11)
        loss = model(input_ids=zoo_ids()).square().sum()
        loss.backward()
        losses.append(loss)
    assert_close(losses[0], losses[1], **TOL)
    grads = {n.replace(".adapters.default", ""): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    for name, p in theirs.named_parameters():
        if p.requires_grad:
            key = name.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
            assert_close(grads[key], p.grad, **TOL, msg=name)


class GroupedConv(nn.Module):
    """A grouped (groups=2) and a depthwise convolution, float64."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.grouped = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect")
        self.head = nn.Linear(8, 3)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.depthwise(self.grouped(x)).mean((2, 3)))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_grouped_convolutions_give_peft_outputs_and_refuse_merging(use_dora: bool, tmp_path: Path) -> None:
    """LoRA and DoRA on grouped and depthwise convolutions: PEFT's layout (B grouped, r a multiple of the groups),
    PEFT's outputs for PEFT's weights, and a merge refused (as PEFT refuses it) with the model unchanged."""
    options = {"r": 8, "lora_alpha": 4, "target_modules": ["grouped", "depthwise"], "use_dora": use_dora}
    with pytest.warns(UserWarning, match="groups"):
        theirs = peft.get_peft_model(GroupedConv(), peft.LoraConfig(**options))
    randomize(theirs, 5)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(GroupedConv(), tmp_path)
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        expected = theirs(x)
        assert_close(ours(x), expected, **TOL, changed_from=GroupedConv()(x))
    before = weights_of(ours)
    with pytest.raises(MergeError, match="groups=2"):
        ours.merge_adapter()
    assert_identical(weights_of(ours), before)
    with pytest.raises(ConfigError, match="divisible"):
        get_peft_model(GroupedConv(), LoraConfig(**{**options, "r": 3}))
