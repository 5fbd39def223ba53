"""LoRA on parameters: ``target_parameters`` on the 3-D expert tensors of a tiny Qwen3-MoE, and LoRA on
``nn.MultiheadAttention``; PEFT's keys and outputs both ways, merging, two adapters at once, gradients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_option_helpers import peft_config_of, weights_of
from torch import nn

from grafting import AdapterStateError, ConfigError, LoraConfig, PeftModel, get_peft_model
from grafting.model.routing import BASE
from grafting.testing import assert_close
from grafting_lora.parameters import LoraMultiheadAttention, LoraParameters

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def moe() -> nn.Module:
    """A tiny Qwen3-MoE (float32: its grouped expert kernel takes no float64), experts as 3-D parameters."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )
    return Qwen3MoeForCausalLM(config).eval()


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0])


def mha() -> nn.Module:
    torch.manual_seed(0)
    return Attention().double().eval()


MODELS = {"moe": moe, "mha": mha}


def inputs(kind: str, batch: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    if kind == "moe":
        return {"input_ids": torch.randint(0, 64, (batch, 7), generator=gen)}
    return {"x": torch.randn(batch, 5, 8, generator=gen, dtype=torch.float64)}


def run(model: Any, kind: str, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs(kind), **kwargs)
    return out.logits if kind == "moe" else out


def config(kind: str, **kwargs: Any) -> LoraConfig:
    if kind == "moe":
        options = {"target_modules": ["q_proj"], "target_parameters": EXPERTS}
    else:
        options = {"target_modules": ["attn"]}
    return LoraConfig(**{"r": 2, "lora_alpha": 4, "init_lora_weights": False, **options, **kwargs})


def tight(kind: str) -> dict[str, float]:
    return {} if kind == "moe" else {"rtol": 1e-10, "atol": 1e-10}  # float32 defaults, or float64 math


def test_adapter_classes_and_peft_keys() -> None:
    model = get_peft_model(moe(), config("moe"))
    experts = model.base_model.model.model.layers[0].mlp.experts
    assert isinstance(experts.adapters["default"], LoraParameters)
    theirs = peft.get_peft_model(moe(), peft_config_of(model.peft_config["default"]))
    ours = {k.replace(".adapters.default", ""): tuple(v.shape) for k, v in model.state_dict().items() if "lora_" in k}
    reference = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(theirs).items()}
    assert ours == reference
    attention = get_peft_model(mha(), config("mha"))
    assert isinstance(attention.base_model.model.attn.adapters["default"], LoraMultiheadAttention)


@pytest.mark.parametrize("kind", ["moe", "mha"])
@settings(max_examples=3, deadline=None)
@given(r=st.integers(1, 3), alpha=st.sampled_from([1, 4, 6]), rslora=st.booleans(), seed=st.integers(0, 2**16))
def test_saved_both_ways_with_the_same_outputs(
    kind: str, r: int, alpha: int, rslora: bool, seed: int, tmp_path_factory: Any
) -> None:
    folder = tmp_path_factory.mktemp(kind)
    torch.manual_seed(seed)
    ours = get_peft_model(MODELS[kind](), config(kind, r=r, lora_alpha=alpha, use_rslora=rslora))
    expected = run(ours, kind)
    ours.save_pretrained(folder)
    theirs = peft.PeftModel.from_pretrained(MODELS[kind](), folder)
    assert_close(run(theirs, kind), expected, changed_from=run(MODELS[kind](), kind), **tight(kind))

    torch.manual_seed(seed + 1)
    theirs = peft.get_peft_model(MODELS[kind](), peft_config_of(config(kind, r=r, lora_alpha=alpha)))
    theirs.save_pretrained(folder / "peft")
    back = PeftModel.from_pretrained(MODELS[kind](), folder / "peft")
    assert_close(run(back, kind), run(theirs, kind), **tight(kind))
    mine, reference = weights_of(back.merge_and_unload()), weights_of(theirs.merge_and_unload())
    for key, value in reference.items():
        assert_close(mine[key], value, msg=key, **tight(kind))


@pytest.mark.parametrize("kind", ["moe", "mha"])
def test_merge_two_adapters_and_routing(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(3)
    ours = get_peft_model(MODELS[kind](), config(kind))
    ours.add_adapter("other", config(kind, r=3))
    ours.save_pretrained(tmp_path)
    before = weights_of(MODELS[kind]())
    ours.base_model.set_adapter(["default", "other"])
    both = run(ours, kind)
    theirs = peft.PeftModel.from_pretrained(MODELS[kind](), tmp_path)
    theirs.load_adapter(tmp_path / "other", adapter_name="other")
    theirs.base_model.set_adapter(["default", "other"])
    assert_close(run(theirs, kind), both, **tight(kind))

    ours.merge_adapter()
    assert_close(run(ours, kind), both, **tight(kind))
    ours.unmerge_adapter()
    for key, value in weights_of(ours.base_model.model).items():
        if ".adapters." not in key:
            assert_close(value, before[key.replace(".base_layer", "")], msg=key, **tight(kind))
    with pytest.raises(AdapterStateError, match="per-sample"):
        run(ours, kind, adapter_names=["default", BASE, "other"])


@pytest.mark.parametrize("kind", ["moe", "mha"])
def test_gradients_as_peft(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(4)
    ours = get_peft_model(MODELS[kind](), config(kind))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(MODELS[kind](), tmp_path, is_trainable=True)
    grads = []
    for model in (ours, theirs):
        out = model(**inputs(kind))
        (out.logits if kind == "moe" else out).square().sum().backward()
        grads.append(
            {
                n.replace(".adapters.default", "").replace(".default", ""): p.grad
                for n, p in model.named_parameters()
                if p.requires_grad
            }
        )
    assert grads[0].keys() == grads[1].keys()
    for key, grad in grads[1].items():
        assert_close(grads[0][key], grad, msg=key, **tight(kind))


def test_options_peft_refuses_on_parameters() -> None:
    for options in ({"lora_dropout": 0.1}, {"use_dora": True}, {"init_lora_weights": "pissa"}):
        with pytest.raises(ConfigError, match="parameters"):
            get_peft_model(moe(), config("moe", **options))
        with pytest.raises(ConfigError, match="parameters"):
            get_peft_model(mha(), config("mha", **options))
    with pytest.raises(ConfigError, match="no_such"):
        get_peft_model(moe(), config("moe", target_parameters=["no_such"]))
    model = moe()
    before = weights_of(model)
    with pytest.raises(ConfigError, match="target_parameters"):
        get_peft_model(model, config("moe", target_modules=["experts"]))
    assert all(torch.equal(v, before[k]) for k, v in weights_of(model).items())
