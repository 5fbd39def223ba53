"""Adapted layers inside adapted layers: matching, names on disk, forward, routing, unload.

A toy method adapts a whole MLP block (its delta calls the block's own
``up_proj`` and ``down_proj``); TOY_DELTA (tests/toy_methods.py) adapts ``up_proj`` inside it. The core
must treat the inner layer as in a plain model whatever the order of adding.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import attrs
import pytest
import torch
from torch import nn

import grafting
from grafting import AdapterConfig, DeltaAdapter, LayerCall, Method, get_peft_model, hookimpl
from grafting.io.state_dict import get_peft_model_state_dict
from grafting.model.layer import AdaptedLayer
from grafting.model.matching import candidate_modules, logical_path, physical_path
from grafting.testing import assert_close
from tests.helpers import base_logits, base_model, inputs, logits, randomize
from tests.toy_methods import ToyDeltaConfig

pytestmark = pytest.mark.usefixtures("toy_methods")


@attrs.define(kw_only=True)
class ToyBlockConfig(AdapterConfig):
    peft_type: ClassVar[str] = "TOY_BLOCK"


class ToyBlock(DeltaAdapter):
    """``delta = s · down_proj(up_proj(x))`` through the block's own (possibly adapted) projections."""

    mergeable = False

    def __init__(self) -> None:
        super().__init__()
        self.toy_block_s = nn.Parameter(torch.tensor([0.5]))

    def forward(self, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        block = call.base_layer
        return self.toy_block_s * block.down_proj(block.up_proj(x))


class ToyBlockPlugin:
    @hookimpl
    def grafting_methods(self) -> list[Method]:
        return [Method(peft_type="TOY_BLOCK", name="toy_block", config_class=ToyBlockConfig)]

    @hookimpl
    def grafting_create_layer_adapter(self, config: Any, base_layer: nn.Module) -> nn.Module | None:
        return ToyBlock() if isinstance(config, ToyBlockConfig) and hasattr(base_layer, "up_proj") else None


@pytest.fixture(scope="module", autouse=True)
def toy_block() -> Iterator[None]:
    plugin = ToyBlockPlugin()
    grafting.register_plugin(plugin, name="toy-block")
    yield
    grafting.unregister_plugin(plugin)


INNER = {"target_modules": ["up_proj"], "scale": 0.3}


def nested(order: str) -> Any:
    """Llama with the toy block on layer 1's mlp and TOY_DELTA on every up_proj, added in ``order``."""
    block = ToyBlockConfig(target_modules=["layers.1.mlp"])
    inner = ToyDeltaConfig(**INNER)
    first, second = (
        (("block", block), ("inner", inner)) if order == "block-first" else (("inner", inner), ("block", block))
    )
    model = get_peft_model(base_model("llama"), first[1], adapter_name=first[0], mixed=True)
    model.add_adapter(second[0], second[1])
    model.set_adapter(["block", "inner"])
    randomize(model, seed=1, adapter_name="inner")
    return model


ORDERS = ["block-first", "inner-first"]


@pytest.mark.parametrize("order", ORDERS)
def test_inner_names_are_the_plain_models_and_convert_both_ways(order: str) -> None:
    model = nested(order).base_model.model
    names = [n for n, _ in candidate_modules(model)]
    assert "model.layers.1.mlp.up_proj" in names
    assert not any("base_layer" in n or "adapters" in n for n in names)
    assert physical_path(model, "model.layers.1.mlp.up_proj") == "model.layers.1.mlp.base_layer.up_proj"
    for name, module in candidate_modules(model):
        path = physical_path(model, name)
        assert model.get_submodule(path) is module
        assert logical_path(model, path) == name
    assert (
        logical_path(model, "model.layers.1.mlp.base_layer.up_proj.base_layer")
        == "model.layers.1.mlp.up_proj.base_layer"
    )


@pytest.mark.parametrize("order", ORDERS)
def test_forward_composes_through_the_inner_adapter_and_keys_are_those_of_the_inner_alone(order: str) -> None:
    model = nested(order)
    mlp = model.base_model.model.model.layers[1].mlp
    assert isinstance(mlp, AdaptedLayer)
    assert isinstance(mlp.base_layer.up_proj, AdaptedLayer)
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        expected = mlp.base_layer(x) + 0.5 * mlp.base_layer.down_proj(mlp.base_layer.up_proj(x))
        assert_close(mlp(x), expected, changed_from=mlp.base_layer(x), msg="block output")
    alone = get_peft_model(base_model("llama"), ToyDeltaConfig(**INNER))
    assert sorted(get_peft_model_state_dict(model, adapter_name="inner")) == sorted(get_peft_model_state_dict(alone))
    assert sorted(get_peft_model_state_dict(model, adapter_name="block")) == [
        "base_model.model.model.layers.1.mlp.toy_block_s"
    ]


@pytest.mark.parametrize("order", ORDERS)
def test_save_load_and_unload(order: str, tmp_path) -> None:
    model = nested(order)
    expected = logits(model, "llama")
    model.save_pretrained(tmp_path)
    loaded = grafting.PeftModel.from_pretrained(base_model("llama"), tmp_path, mixed=True)
    assert_close(logits(loaded, "llama"), expected, changed_from=base_logits("llama"), msg="reloaded mix")
    plain = loaded.unload()
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    assert_close(logits(plain, "llama"), base_logits("llama"), changed_from=expected, msg="unloaded")


def test_delete_the_outer_adapter_keeps_the_inner_one() -> None:
    model = nested("block-first")
    model.delete_adapter("block")
    mlp = model.base_model.model.model.layers[1].mlp
    assert not isinstance(mlp, AdaptedLayer)
    assert isinstance(mlp.up_proj, AdaptedLayer)
    assert sorted(get_peft_model_state_dict(model, adapter_name="inner")) == sorted(
        get_peft_model_state_dict(get_peft_model(base_model("llama"), ToyDeltaConfig(**INNER)))
    )


def test_routed_samples_see_only_their_adapter_in_nested_layers() -> None:
    model = nested("block-first")
    names = ["block", "inner", "__base__"]
    batch = inputs("llama", batch=3)
    with torch.no_grad():
        routed = model(**batch, adapter_names=names).logits
        for i, name in enumerate(names):
            one = {k: v[i : i + 1] for k, v in batch.items()}
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(**one).logits
            else:
                model.set_adapter(name)
                alone = model(**one).logits
            assert_close(routed[i : i + 1], alone, msg=f"sample routed to {name}")
    model.set_adapter(["block", "inner"])
