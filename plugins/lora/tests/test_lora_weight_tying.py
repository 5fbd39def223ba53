"""ensure_weight_tying for LoRA and modules_to_save on a tied embedding (Llama with tie_word_embeddings, GPT-2):
the head's adapter is the embedding's, saved in PEFT's keys; PEFT loads ours and we load PEFT's, same logits;
one parameter per tensor (gradients from both layers meet), merge = unmerge, routing, PEFT's warnings."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_option_helpers import F64, TOL
from safetensors.torch import load_file, save_file

from grafting import (
    AdapterLoadError,
    ConfigError,
    GraftingWarning,
    IA3Config,
    LoraConfig,
    MergeError,
    PeftModel,
    get_peft_model,
    set_peft_model_state_dict,
)
from grafting.model.routing import BASE
from grafting.testing import assert_close, assert_identical, tiny_gpt2, tiny_llama
from grafting_lora.trainable_tokens import TiedTrainableTokens
from grafting_lora.tying import TiedLoraHead


def tied_llama(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).to(F64).eval()


def gpt2() -> torch.nn.Module:
    return tiny_gpt2().to(F64)


def ids(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (batch, 7), generator=torch.Generator().manual_seed(seed))


def logits(model: Any, batch: int = 3, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids(batch), **kwargs).logits


@torch.no_grad()
def randomize(model: Any, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
        p.add_(torch.randn(p.shape, generator=gen, dtype=F64).to(p.dtype) * 0.3)


def quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def adapter_keys(folder: Path) -> set[str]:
    """The adapter's saved keys less the base embedding weights PEFT adds by its save_embedding_layers="auto"."""
    return {k for k in load_file(folder / "adapter_model.safetensors") if not k.endswith("base_layer.weight")}


#: (options, the module holding the trained tensors, whether the head is tied to it)
CASES = {
    "lora-embed": dict(target_modules=["embed_tokens", "q_proj"]),
    "lora-head": dict(target_modules=["lm_head"]),
    "lora-regex": dict(target_modules=r".*(embed_tokens|v_proj)"),
    "save-embed": dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
    "save-head": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize(
    ("case", "ensure"), [(case, True) for case in sorted(CASES)] + [("lora-embed", False), ("save-head", False)]
)
def test_peft_interop_both_ways(tmp_path: Path, case: str, ensure: bool) -> None:
    """The key set and rewritten options are PEFT's; each loads the other's file with the same logits."""
    options = dict(CASES[case], ensure_weight_tying=ensure)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = get_peft_model(tied_llama(), LoraConfig(**options))
    if not ensure:  # PEFT warns that a tied layer is adapted without tying
        assert any("share one weight" in str(w.message) for w in caught)
    randomize(ours, 1)
    ours.save_pretrained(tmp_path / "ours")
    theirs_alone = quiet(peft.get_peft_model, tied_llama(), peft.LoraConfig(**options))
    quiet(theirs_alone.save_pretrained, tmp_path / "peft")
    assert adapter_keys(tmp_path / "ours") == adapter_keys(tmp_path / "peft")
    for field in ("target_modules", "modules_to_save"):
        mine, peft_value = (
            getattr(ours.peft_config["default"], field),
            getattr(theirs_alone.peft_config["default"], field),
        )
        assert (set(mine) if isinstance(mine, list) else mine) == (
            set(peft_value) if isinstance(peft_value, (list, set)) else peft_value
        )
    base = logits(tied_llama())
    expected = logits(ours)
    theirs = quiet(peft.PeftModel.from_pretrained, tied_llama(), tmp_path / "ours", is_trainable=True)
    assert_close(logits(theirs), expected, changed_from=base, **TOL)
    randomize(theirs, 2)  # PEFT's file, trained further by PEFT, into grafting
    quiet(theirs.save_pretrained, tmp_path / "peft-trained")
    back = quiet(PeftModel.from_pretrained, tied_llama(), tmp_path / "peft-trained")
    assert_close(logits(back), logits(theirs), changed_from=expected, **TOL)


def test_lora_tied_is_one_set_of_factors() -> None:
    """The head reads the embedding's factors: one parameter each, a training step keeps them tied."""
    model = get_peft_model(tied_llama(), LoraConfig(target_modules=["embed_tokens"], ensure_weight_tying=True))
    head = model.base_model.model.lm_head.adapters["default"]
    embedding = model.base_model.model.model.embed_tokens.adapters["default"]
    assert isinstance(head, TiedLoraHead)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "base_model.model.model.embed_tokens.adapters.default.lora_embedding_A",
        "base_model.model.model.embed_tokens.adapters.default.lora_embedding_B",
    ]
    randomize(model, 3)
    loss = model(input_ids=ids(), labels=ids()).loss
    loss.backward()
    grad_both = embedding.lora_embedding_B.grad.clone()
    embedding.zero_grad()
    with torch.no_grad():  # the gradient through the embedding alone differs: the head's part adds to it
        head_off = model.base_model.model.lm_head
        head_off.disabled = True
    model(input_ids=ids(), labels=ids()).loss.backward()
    head_off.disabled = False
    assert (grad_both - embedding.lora_embedding_B.grad).abs().max() > 1e-6
    torch.optim.AdamW(model.parameters(), lr=0.1).step()
    assert_identical(head.lora_A.weight, embedding.lora_embedding_B.T)
    assert_identical(head.lora_B.weight, embedding.lora_embedding_A.T)


@settings(max_examples=6, deadline=None)
@given(
    r=st.integers(1, 4),
    alpha=st.sampled_from([1, 4, 16]),
    seed=st.integers(0, 50),
    arch=st.sampled_from(["llama", "gpt2"]),
    saved=st.booleans(),
)
def test_tied_properties(tmp_path_factory: Any, r: int, alpha: int, seed: int, arch: str, saved: bool) -> None:
    """merged = unmerged (the shared weight changed once), disabled = base, save → load identical,
    per-sample routing = each adapter alone, and the unloaded model still ties its weights."""
    make = tied_llama if arch == "llama" else gpt2
    options: dict[str, Any] = {"target_modules": ["lm_head"]}
    if saved:
        options = {"target_modules": ["q_proj" if arch == "llama" else "c_attn"], "modules_to_save": ["lm_head"]}
    config = LoraConfig(r=r, lora_alpha=alpha, ensure_weight_tying=True, **options)
    model = quiet(get_peft_model, make(), config)
    randomize(model, seed)
    base, out = logits(make()), logits(model)
    with model.disable_adapter():
        assert_close(logits(model), base, **TOL)
    folder = tmp_path_factory.mktemp("tied")
    model.save_pretrained(folder)
    loaded = quiet(PeftModel.from_pretrained, make(), folder)
    assert_identical(logits(loaded), out)
    quiet(model.add_adapter, "other", LoraConfig(r=r, lora_alpha=alpha, ensure_weight_tying=True, **options))
    model.set_adapter("other")  # trains "other" only
    randomize(model, seed + 1)
    other = logits(model)
    routed = logits(model, adapter_names=["default", "other", BASE])
    assert_close(
        routed, torch.stack([out[0], other[1], base[2]]), changed_from=torch.stack([base[0], base[1], out[2]]), **TOL
    )
    model.set_adapter("default")
    model.merge_adapter()
    assert_close(logits(model), out, changed_from=base, **TOL)
    model.unmerge_adapter()
    assert_close(logits(model), out, **TOL)
    plain = model.merge_and_unload()
    assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight
    assert_close(logits(plain), out, **TOL)


def test_mixed_with_other_adapters_on_the_tied_layers() -> None:
    """Two tied LoRA adapters active together: merge = unmerge (each changes the shared weight once); an IA3 on
    the same head scales the tied LoRA's logits like the base's (its OUTPUT site comes after the deltas)."""
    config = LoraConfig(target_modules=["embed_tokens"], ensure_weight_tying=True)
    model = quiet(get_peft_model, tied_llama(), config, mixed=True)
    randomize(model, 4)
    quiet(model.add_adapter, "b", LoraConfig(r=3, target_modules=["lm_head"], ensure_weight_tying=True))
    model.set_adapter("b")
    randomize(model, 5)
    model.set_adapter(["default", "b"])
    both, base = logits(model), logits(tied_llama())
    model.merge_adapter()
    assert_close(logits(model), both, changed_from=base, **TOL)
    model.unmerge_adapter()
    quiet(model.add_adapter, "ia3", IA3Config(target_modules=["lm_head"], feedforward_modules=[]))
    model.set_adapter("ia3")
    randomize(model, 6)
    scale = model.base_model.model.lm_head.adapters["ia3"].ia3_l.flatten()
    model.set_adapter(["default", "b", "ia3"])
    assert_close(logits(model), both * scale, changed_from=both, **TOL)


def test_inconsistent_tied_file_is_refused(tmp_path: Path) -> None:
    """A file whose head factors are not the embedding's transposed would leave one of them unloaded: refused,
    the model untouched."""
    config = LoraConfig(target_modules=["embed_tokens"], ensure_weight_tying=True)
    model = get_peft_model(tied_llama(), config)
    randomize(model, 5)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    weights["base_model.model.lm_head.lora_A.weight"] = weights["base_model.model.lm_head.lora_A.weight"] + 1
    save_file(weights, tmp_path / "adapter_model.safetensors")
    target = get_peft_model(tied_llama(), config)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(AdapterLoadError, match=r"lm_head\.lora_A\.weight"):
        set_peft_model_state_dict(target, {k: v.to(F64) for k, v in weights.items()})
    assert_identical(target.state_dict(), before)


def test_gpt2_tie_survives_a_reload(tmp_path: Path) -> None:
    """GPT-2's embedding is not called embed_tokens: the saved target_modules keep lm_head so that a load ties
    again (PEFT's own file drops it, and PEFT reloads it untied); PEFT loads ours with the same logits."""
    model = get_peft_model(gpt2(), LoraConfig(target_modules=["lm_head"], ensure_weight_tying=True))
    assert set(model.peft_config["default"].target_modules) == {"lm_head", "transformer.wte"}
    randomize(model, 6)
    model.save_pretrained(tmp_path)
    for loaded in (
        PeftModel.from_pretrained(gpt2(), tmp_path),
        quiet(peft.PeftModel.from_pretrained, gpt2(), tmp_path),
    ):
        assert_close(logits(loaded), logits(model), changed_from=logits(gpt2()), **TOL)


def test_warnings_and_refusals() -> None:
    with pytest.warns(GraftingWarning, match="nothing is tied"):  # the model ties nothing
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["embed_tokens"], ensure_weight_tying=True))
    with pytest.warns(GraftingWarning, match="neither modules_to_save nor target_modules"):
        get_peft_model(tied_llama(), LoraConfig(target_modules=["q_proj"], ensure_weight_tying=True))
    with pytest.warns(GraftingWarning, match="cannot tie"):  # a method without the option, as PEFT warns
        get_peft_model(
            tied_llama(), IA3Config(target_modules=["q_proj"], feedforward_modules=[], modules_to_save=["lm_head"])
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_peft_model(tied_llama(), LoraConfig(target_modules=["q_proj"]))  # nothing tied is touched: silent
    with pytest.raises(ConfigError, match="use_dora"):
        get_peft_model(
            tied_llama(), LoraConfig(target_modules=["embed_tokens"], use_dora=True, ensure_weight_tying=True)
        )
    with pytest.raises(ConfigError, match="rank"):
        get_peft_model(
            tied_llama(),
            LoraConfig(target_modules=["embed_tokens"], rank_pattern={"lm_head": 2}, ensure_weight_tying=True),
        )


def test_modules_to_save_copies_share_one_parameter() -> None:
    model = get_peft_model(
        tied_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True)
    )
    inner = model.base_model.model
    assert inner.lm_head.modules_to_save["default"].weight is inner.model.embed_tokens.modules_to_save["default"].weight
    theirs = quiet(
        peft.get_peft_model,
        tied_llama(),
        peft.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True),
    )
    assert model.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_t5_ties_the_head_as_peft(tmp_path: Path) -> None:
    """T5 shares one weight among shared, encoder/decoder embed_tokens and lm_head: PEFT ties the head to
    ``shared`` and gives the two other embeddings their own LoRA; the same keys and logits both ways."""
    from grafting.testing import model_output, sample_inputs, tiny_t5

    def t5() -> torch.nn.Module:
        return tiny_t5().to(F64)

    options = {"target_modules": ["q", "embed_tokens"], "ensure_weight_tying": True, "init_lora_weights": False}
    ours = get_peft_model(t5(), LoraConfig(**options))
    assert isinstance(ours.base_model.model.lm_head.adapters["default"], TiedLoraHead)
    randomize(ours, 8)
    ours.save_pretrained(tmp_path / "ours")
    theirs_alone = quiet(peft.get_peft_model, t5(), peft.LoraConfig(**options))
    quiet(theirs_alone.save_pretrained, tmp_path / "peft")
    assert adapter_keys(tmp_path / "ours") == adapter_keys(tmp_path / "peft")
    inputs = sample_inputs("t5")
    with torch.no_grad():
        expected, base = model_output(ours, inputs), model_output(t5(), inputs)
        theirs = quiet(peft.PeftModel.from_pretrained, t5(), tmp_path / "ours", is_trainable=True)
        assert_close(model_output(theirs, inputs), expected, changed_from=base, **TOL)
        assert_close(model_output(PeftModel.from_pretrained(t5(), tmp_path / "ours"), inputs), expected, **TOL)
        # PEFT's saved target_modules ({"q", "shared"}) no longer name an embedding: PEFT reloads its own file
        # untied (the head's keys unexpected, the logits wrong); grafting refuses it, naming the keys
        mine = quiet(peft.PeftModel.from_pretrained, t5(), tmp_path / "peft")
        assert not isinstance(mine.base_model.model.lm_head, type(theirs.base_model.model.lm_head))
        with pytest.raises(AdapterLoadError, match="fit no adapter tensor"):
            quiet(PeftModel.from_pretrained, t5(), tmp_path / "peft")


def test_gradients_are_the_sum_of_peft_two_leaves(tmp_path: Path) -> None:
    """PEFT's head holds transposed views of the embedding's factors as two more leaves; grafting's one
    parameter gets the sum of both gradients (what a tied weight's gradient is)."""
    config = LoraConfig(target_modules=["embed_tokens"], ensure_weight_tying=True)
    ours = get_peft_model(tied_llama(), config)
    randomize(ours, 10)
    ours.save_pretrained(tmp_path)
    theirs = quiet(peft.PeftModel.from_pretrained, tied_llama(), tmp_path, is_trainable=True)
    for model in (ours, theirs):
        model(input_ids=ids(), labels=ids()).loss.backward()
    mine = dict(ours.named_parameters())
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    emb, head = "base_model.model.model.embed_tokens", "base_model.model.lm_head"
    for factor, partner in (("lora_embedding_B", "lora_A"), ("lora_embedding_A", "lora_B")):
        expected = grads[f"{emb}.{factor}.default"] + grads[f"{head}.{partner}.default.weight"].T
        got = mine[f"{emb}.adapters.default.{factor}"].grad
        assert_close(got, expected, changed_from=grads[f"{emb}.{factor}.default"], **TOL)


@settings(max_examples=4, deadline=None)
@given(
    r=st.integers(1, 4),
    alpha=st.sampled_from([1, 8, 32]),
    rslora=st.booleans(),
    case=st.sampled_from(["lora-embed", "lora-head", "save-embed"]),
    seed=st.integers(0, 2**16),
)
def test_peft_loads_random_tied_configs(
    tmp_path_factory: Any, r: int, alpha: int, rslora: bool, case: str, seed: int
) -> None:
    options = dict(CASES[case], r=r, lora_alpha=alpha, use_rslora=rslora, ensure_weight_tying=True)
    ours = get_peft_model(tied_llama(), LoraConfig(**options))
    randomize(ours, seed)
    folder = tmp_path_factory.mktemp("tied-random")
    ours.save_pretrained(folder)
    theirs = quiet(peft.PeftModel.from_pretrained, tied_llama(), folder)
    assert_close(logits(theirs), logits(ours), changed_from=logits(tied_llama()), **TOL)


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(target_modules=["embed_tokens"], ensure_weight_tying=True),
        LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, 3]),
    ],
    ids=["lora", "trainable-tokens"],
)
def test_a_head_untied_after_adapting_refuses_the_merge(config: LoraConfig) -> None:
    """A head adapter that follows the embedding's merges only while the weight is still shared."""
    model = get_peft_model(tied_llama(), config)
    randomize(model, 4)
    head = model.base_model.model.lm_head
    assert isinstance(head.adapters["default"], TiedLoraHead | TiedTrainableTokens)
    head.base_layer.weight = torch.nn.Parameter(head.base_layer.weight.detach().clone(), requires_grad=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MergeError, match="Linear no longer shares its weight with the"):
        model.merge_adapter()
    assert_identical(model.state_dict(), before)
