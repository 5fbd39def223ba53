"""trainable_token_indices: a few embedding rows trained beside LoRA, in PEFT's format both ways;
the output head tied to the embedding follows the same rows; merging, routing, gradients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_option_helpers import F64, TOL, assert_moves, assert_rows_route_alone, peft_config_of, weights_of

from grafting import (
    ConfigError,
    GraftingWarning,
    LoraConfig,
    PeftModel,
    TargetNotFoundError,
    UnsupportedLayerError,
    get_peft_model,
)
from grafting.model.routing import BASE
from grafting.testing import assert_close, tiny_model
from grafting_lora.trainable_tokens import TiedTrainableTokens, TrainableTokens

#: llama: its own output head; gpt2: the head shares the embedding's weight.
EMBEDDING = {"llama": "embed_tokens", "gpt2": "wte"}
ATTENTION = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
KEY = {
    "llama": "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
    "gpt2": "base_model.model.transformer.wte.token_adapter.trainable_tokens_delta",
}


def base(arch: str) -> torch.nn.Module:
    return tiny_model(arch).to(F64)


def ids(batch: int = 3, seed: int = 0) -> torch.Tensor:
    out = torch.randint(0, 64, (batch, 7), generator=torch.Generator().manual_seed(seed))
    out[:, :3] = torch.tensor([1, 3, 5])  # every sample holds some trained tokens
    return out


def logits(model: Any, batch: int = 3, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids(batch), **kwargs).logits


@torch.no_grad()
def randomize(model: Any, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
        p.add_(torch.randn(p.shape, generator=gen, dtype=F64).to(p.dtype) * 0.3)


def config(arch: str, tokens: Any, **kwargs: Any) -> LoraConfig:
    options = {"r": 2, "target_modules": ATTENTION[arch], "fan_in_fan_out": arch == "gpt2", **kwargs}
    return LoraConfig(trainable_token_indices=tokens, **options)


token_lists = st.lists(st.integers(0, 63), min_size=1, max_size=5, unique=True).map(lambda t: sorted({1, *t}))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapters_on_the_embedding_and_the_tied_head(arch: str) -> None:
    model = get_peft_model(base(arch), config(arch, [1, 3, 5]))
    inner = model.base_model.model
    layers = {type(a) for m in inner.modules() if hasattr(m, "adapters") for a in m.adapters.values()}
    assert TrainableTokens in layers
    assert (TiedTrainableTokens in layers) == (arch == "gpt2")
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad and "token" in n)
    assert len(trainable) == 1  # one set of rows, even for the tied head
    assert [k for k in model.state_dict() if "token_adapter" in k] == [trainable[0]]  # buffers are not saved
    assert_close(logits(model), logits(base(arch)), **TOL)  # starts as the base model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@settings(max_examples=4, deadline=None)
@given(tokens=token_lists, as_dict=st.booleans(), seed=st.integers(0, 2**16))
def test_grafting_saves_peft_loads_and_back(
    arch: str, tokens: list[int], as_dict: bool, seed: int, tmp_path_factory: Any
) -> None:
    folder = tmp_path_factory.mktemp("tokens")
    ours = get_peft_model(base(arch), config(arch, {EMBEDDING[arch]: tokens} if as_dict else tokens))
    randomize(ours, seed)
    expected = logits(ours)
    assert_moves(expected, logits(base(arch)))
    ours.save_pretrained(folder)

    theirs = peft.PeftModel.from_pretrained(base(arch), folder)
    assert KEY[arch] in peft.get_peft_model_state_dict(theirs)
    assert_close(logits(theirs), expected, **TOL)
    randomize(theirs, seed + 1)
    theirs.save_pretrained(folder / "peft")
    back = PeftModel.from_pretrained(base(arch), folder / "peft")
    assert_close(logits(back), logits(theirs), **TOL)
    mine, reference = weights_of(back.merge_and_unload()), weights_of(theirs.merge_and_unload())
    for key, value in reference.items():
        assert_close(mine[key], value, **TOL, msg=key)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_unmerge_and_per_sample_with_another_adapter(arch: str) -> None:
    model = get_peft_model(base(arch), config(arch, [1, 3, 5]))
    model.add_adapter("other", config(arch, [3, 7], r=3))
    randomize(model, 4)
    before = weights_of(base(arch))
    model.set_adapter("default")
    expected = logits(model)
    model.merge_adapter()
    assert_close(logits(model), expected, **TOL)
    model.unmerge_adapter()
    for key, value in weights_of(model.base_model.model).items():
        if ".adapters." not in key:
            assert_close(value, before[key.replace(".base_layer", "")], **TOL, msg=key)

    assert_rows_route_alone(model, ids(), ["other", BASE, "default"], **TOL)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_gradients_as_peft(arch: str) -> None:
    ours = get_peft_model(base(arch), config(arch, [1, 3, 5], init_lora_weights=False))
    theirs = peft.get_peft_model(base(arch), peft_config_of(ours.peft_config["default"]))
    with torch.no_grad():
        for model in (ours, theirs):
            gen = torch.Generator().manual_seed(2)
            for _, p in sorted((n, p) for n, p in model.named_parameters() if "token" in n and p.requires_grad):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
            for _, p in sorted((n, p) for n, p in model.named_parameters() if "lora_" in n):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * 0.2)
    grads = []
    for model in (ours, theirs):
        model(input_ids=ids()).logits.square().sum().backward()
        grads.append(next(p.grad for n, p in model.named_parameters() if "trainable_tokens_delta" in n))
    assert grads[0].abs().max() > 1e-3
    assert_close(grads[0], grads[1], **TOL)


def test_errors_name_the_option() -> None:
    with pytest.raises(ConfigError, match="trainable_token_indices"):
        LoraConfig(trainable_token_indices=[1, 1])
    with pytest.raises(ConfigError, match="trainable_token_indices"):
        LoraConfig(trainable_token_indices={"embed_tokens": []})
    with pytest.raises(ConfigError, match="target_modules"):
        get_peft_model(base("llama"), LoraConfig(target_modules=["embed_tokens"], trainable_token_indices=[1]))
    with pytest.raises(TargetNotFoundError, match="no_such"):
        get_peft_model(base("llama"), config("llama", {"no_such": [1]}))
    with pytest.raises(UnsupportedLayerError, match=r"nn\.Embedding"):
        get_peft_model(base("llama"), config("llama", {"model.norm": [1]}))
    model = base("llama")
    before = weights_of(model)
    with pytest.raises(ConfigError, match="modules_to_save"):
        get_peft_model(model, config("llama", [1], modules_to_save=["embed_tokens"]))
    assert all(torch.equal(v, before[k]) for k, v in weights_of(model).items())


def test_config_round_trip(tmp_path: Path) -> None:
    cfg = config("llama", {"embed_tokens": [1, 2]})
    cfg.save_pretrained(tmp_path)
    assert LoraConfig.from_pretrained(tmp_path).trainable_token_indices == {"embed_tokens": [1, 2]}


def test_ensure_weight_tying(tmp_path: Path) -> None:
    """Same ids on a tied head: tied (one set of rows); other ids: separate rows, or an error with the flag."""
    tied = config("gpt2", [1, 3, 5], ensure_weight_tying=True)
    ours = get_peft_model(base("gpt2"), tied)
    assert len([n for n, p in ours.named_parameters() if "token_adapter" in n]) == 1
    randomize(ours, 6)
    ours.save_pretrained(tmp_path / "tied")
    theirs = peft.PeftModel.from_pretrained(base("gpt2"), tmp_path / "tied")
    assert theirs.peft_config["default"].ensure_weight_tying is True
    assert_close(logits(theirs), logits(ours), changed_from=logits(base("gpt2")), **TOL)

    apart = {"wte": [1, 3], "lm_head": [2, 5]}
    with pytest.raises(ConfigError, match="ensure_weight_tying"):
        get_peft_model(base("gpt2"), config("gpt2", apart, ensure_weight_tying=True))
    ours = get_peft_model(base("gpt2"), config("gpt2", apart))  # without the flag: each its own rows, as PEFT
    assert len([n for n, p in ours.named_parameters() if "token_adapter" in n]) == 2
    randomize(ours, 7)
    ours.save_pretrained(tmp_path / "apart")
    theirs = peft.PeftModel.from_pretrained(base("gpt2"), tmp_path / "apart")
    assert_close(logits(theirs), logits(ours), changed_from=logits(base("gpt2")), **TOL)

    with pytest.warns(GraftingWarning, match="ensure_weight_tying"):
        get_peft_model(base("llama"), config("llama", [1], ensure_weight_tying=True))
    with pytest.raises(ConfigError, match="not implemented"):  # DoRA on tied layers (test_lora_weight_tying)
        get_peft_model(base("gpt2"), LoraConfig(target_modules=["lm_head"], use_dora=True, ensure_weight_tying=True))
