"""AdaLoRA on whole models: the invariants every layer method keeps (fresh, pruned and mid-allocation
adapters), PEFT's config checks, and AdaLoRA beside LoRA on one layer."""

from __future__ import annotations

import tempfile
from typing import Any

import attrs
import peft
import pytest
import torch
from adalora_helpers import ARCHS, TARGETS, TOL, base, factors, inputs, options, output, randomize
from grafting_adalora import AdaLoraAdapter
from hypothesis import given
from hypothesis import strategies as st

from grafting import AdaLoraConfig, ConfigError, LoraConfig, PeftModel, get_peft_model
from grafting.errors import UnsupportedLayerError
from grafting.testing import assert_close, assert_identical, base_tensors, check_layer_adapter_invariants


@st.composite
def configs(draw: Any, arch: str) -> AdaLoraConfig:
    names = TARGETS[arch]
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True))
    init_r = draw(st.integers(1, 5))
    kwargs = options(
        arch,
        init_r=init_r,
        target_r=draw(st.integers(1, init_r)),
        lora_alpha=draw(st.sampled_from([1.0, 4.0, 16.0])),
        target_modules=chosen,
    )
    return AdaLoraConfig(**kwargs)


def _pruned(config: AdaLoraConfig, model: Any, seed: int) -> AdaLoraConfig:
    """The config with a rank_pattern keeping a seeded, non-empty subset of each layer's ranks."""
    gen = torch.Generator().manual_seed(seed)
    pattern = {}
    for name, adapter in factors(model).items():
        if name.endswith("lora_E"):
            keep = (torch.rand(adapter.shape[0], generator=gen) < 0.6).tolist()
            keep[0] = True
            pattern[name] = keep
    return attrs.evolve(config, rank_pattern=pattern)


@pytest.mark.parametrize("arch", ARCHS)
@given(data=st.data(), mode=st.sampled_from(["fresh", "pruned", "allocated"]))
def test_adalora_keeps_the_layer_invariants(arch: str, data: st.DataObject, mode: str) -> None:
    config = data.draw(configs(arch))
    model = get_peft_model(base(arch), config)
    if mode == "pruned":  # built from a rank_pattern: the pruned shapes, as a loaded folder has them
        model = get_peft_model(base(arch), _pruned(config, model, seed=1))
    randomize(model, 2)
    if mode == "allocated":  # E masked to the final budget, full shapes in memory, pruned on disk
        batch = inputs(arch)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        for step in range(config.total_step - config.tfinal + 1):  # the importance, then the final budget
            model.base_model.update_and_allocate(step)
        assert sum(map(sum, config.rank_pattern.values())) == config.target_r * len(config.rank_pattern)
    with tempfile.TemporaryDirectory() as folder:
        check_layer_adapter_invariants(model, inputs(arch), lambda: base(arch), folder)


def test_adalora_config_refuses_what_peft_refuses() -> None:
    with pytest.raises(ConfigError, match="total_step"):
        AdaLoraConfig(target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="tinit"):
        AdaLoraConfig(total_step=10, tinit=6, tfinal=4)
    with pytest.raises(ConfigError, match="beta1"):
        AdaLoraConfig(total_step=10, beta1=1.0)
    with pytest.raises(ConfigError, match="use_dora"):
        AdaLoraConfig.from_dict({"peft_type": "ADALORA", "total_step": 10, "use_dora": True})
    with pytest.warns(UserWarning, match="init_r"):
        AdaLoraConfig(total_step=10, r=4)


def test_adalora_config_reads_and_writes_peft_s_json() -> None:
    theirs = peft.AdaLoraConfig(**options("llama", rank_pattern={"model.layers.0.self_attn.q_proj.lora_E": [True]}))
    data = {k: sorted(v) if isinstance(v, set) else v for k, v in theirs.to_dict().items()}
    ours = AdaLoraConfig.from_dict(data)
    assert (ours.init_r, ours.target_r, ours.tinit, ours.tfinal, ours.total_step) == (4, 2, 1, 2, 8)
    written = ours.to_dict()
    assert {k: written[k] for k in data if k not in ("peft_version",)} == {
        k: v for k, v in data.items() if k not in ("peft_version",)
    }


def test_adalora_trains_one_adapter_at_a_time() -> None:
    model = get_peft_model(base("llama"), AdaLoraConfig(**options("llama")))
    before = base_tensors(model)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match="one at a time"):
        model.add_adapter("second", AdaLoraConfig(**options("llama")))
    assert "second" not in model.peft_config
    assert_identical({n: p.detach() for n, p in model.named_parameters()}, params)
    assert_identical(base_tensors(model), before)
    model.add_adapter("frozen", AdaLoraConfig(**options("llama"), inference_mode=True))
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".frozen." in n)


def test_adalora_refuses_layers_it_cannot_adapt() -> None:
    with pytest.raises(UnsupportedLayerError, match="embed_tokens"):
        get_peft_model(base("llama"), AdaLoraConfig(**options("llama", target_modules=["embed_tokens"])))


def test_adalora_and_lora_on_one_layer_add_both_deltas(tmp_path) -> None:
    model = get_peft_model(
        base("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False), mixed=True
    )
    model.add_adapter("ada", AdaLoraConfig(**options("llama", target_modules=["q_proj", "down_proj"])))
    model.set_adapter(["default", "ada"])
    randomize(model, 5)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ada: AdaLoraAdapter = layer.adapters["ada"]
    with torch.no_grad():
        lora = x @ layer.adapters["default"].delta_matrix().T
        expected = layer.base_layer(x) + lora + x @ ada.delta_matrix().T
        assert_close(layer(x), expected, changed_from=layer.base_layer(x) + lora, **TOL)
    adapted = output(model, "llama")
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base("llama"), tmp_path, mixed=True)
    assert_close(output(loaded, "llama"), adapted, changed_from=output(base("llama"), "llama"), **TOL)
    merged = model.merge_and_unload()
    assert_close(output(merged, "llama"), adapted, changed_from=output(base("llama"), "llama"), rtol=1e-9, atol=1e-9)


def test_adalora_routes_each_sample_to_its_adapter() -> None:
    model = get_peft_model(base("llama"), AdaLoraConfig(**options("llama")))
    model.add_adapter("other", AdaLoraConfig(**options("llama", target_modules=["v_proj"]), inference_mode=True))
    randomize(model, 6)
    batch = inputs("llama", batch=3)
    alone = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        alone[name] = model(**batch).logits
    model.set_adapter("default")
    routed = model(**batch, adapter_names=["other", "default", "other"]).logits
    for i, name in enumerate(["other", "default", "other"]):
        assert_close(routed[i], alone[name][i], changed_from=alone["default" if name == "other" else "other"][i])
