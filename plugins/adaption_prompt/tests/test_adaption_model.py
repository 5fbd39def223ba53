"""Adaption prompt on a model: zero gate, disabling, save/load, training, merging, refusals, routing."""

from __future__ import annotations

import pytest
import torch
from adaption_helpers import ARCHS, inputs, logits, open_gates, prompt_parameters, tiny

from grafting import (
    AdaptedLayer,
    AdaptionPromptConfig,
    ConfigError,
    MergeError,
    PeftModel,
    UnsupportedLayerError,
    get_peft_model,
)
from grafting.testing import assert_close, assert_identical, tiny_bert, tiny_t5


def config(**options) -> AdaptionPromptConfig:
    options = {"adapter_len": 3, "adapter_layers": 2, "task_type": "CAUSAL_LM", **options}
    return AdaptionPromptConfig(**options)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_a_fresh_adapter_gives_the_base_output_and_an_open_gate_does_not(arch: str) -> None:
    base = logits(tiny(arch), arch)
    model = get_peft_model(tiny(arch), config())
    fresh = logits(model, arch)
    open_gates(model)
    assert_close(fresh, base, changed_from=logits(model, arch), msg="closed gates")


def test_zero_gate_is_the_base_with_a_biased_output_projection_too() -> None:
    """Only o_proj's linear part is added; the base output already holds its bias."""
    base = logits(tiny("llama", attention_bias=True), "llama")
    model = get_peft_model(tiny("llama", attention_bias=True), config())
    fresh = logits(model, "llama")
    open_gates(model)
    assert_close(fresh, base, changed_from=logits(model, "llama"), msg="closed gates")


@pytest.mark.parametrize("arch", ARCHS)
def test_disabled_is_the_base(arch: str) -> None:
    base = logits(tiny(arch), arch)
    model = get_peft_model(tiny(arch), config())
    open_gates(model)
    adapted = logits(model, arch)
    with model.disable_adapter():
        assert_close(logits(model, arch), base, changed_from=adapted, msg="disabled")
    assert_close(logits(model, arch), adapted, changed_from=base, msg="enabled again")


def test_the_top_layers_are_adapted() -> None:
    user_config = config(adapter_layers=3)
    model = get_peft_model(tiny("llama", layers=4), user_config)
    assert user_config.target_modules is None  # the model keeps a filled-in copy
    wrapped = [
        i for i, layer in enumerate(model.base_model.model.model.layers) if isinstance(layer.self_attn, AdaptedLayer)
    ]
    assert wrapped == [1, 2, 3]
    assert model.peft_config["default"].target_modules == ["self_attn"]


def test_save_then_load_is_bit_identical(tmp_path) -> None:
    model = get_peft_model(tiny("llama"), config())
    open_gates(model, seed=7)
    model.add_adapter("other", config(adapter_len=2, adapter_layers=1))
    open_gates(model, seed=8)
    expected = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        expected[name] = logits(model, "llama")
    model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(tiny("llama"), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    assert state(loaded).keys() == state(model).keys()
    assert_identical(state(loaded), state(model), msg="reloaded state")
    base = logits(tiny("llama"), "llama")
    for name in ("default", "other"):
        loaded.set_adapter(name)
        assert_close(logits(loaded, "llama"), expected[name], changed_from=base, msg=f"reloaded {name!r}")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_changes_only_the_adapter(arch: str) -> None:
    model = get_peft_model(tiny(arch), config())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(prompt_parameters(model))
    before = state(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = inputs(arch, batch=2, seed=3)
    losses = []
    for _ in range(3):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    after = state(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.rsplit(".", 1)[-1] in ("adaption_prompt", "adaption_gate")}
    assert losses[-1] < losses[0]


def test_merging_is_refused_and_leaves_the_model_unchanged() -> None:
    model = get_peft_model(tiny("llama"), config())
    open_gates(model)
    before, expected = state(model), logits(model, "llama")
    with pytest.raises(
        MergeError, match=r"model\.layers\.1\.self_attn: adapter 'default' \(AdaptionPrompt\) cannot be merged"
    ):
        model.merge_and_unload()
    with pytest.raises(MergeError):
        model.merge_adapter()
    assert_identical(state(model), before, msg="after the refused merge")
    assert_close(logits(model, "llama"), expected, changed_from=logits(tiny("llama"), "llama"))
    assert isinstance(model.base_model.model.model.layers[2].self_attn, AdaptedLayer)


@pytest.mark.parametrize("build", [tiny_bert, tiny_t5], ids=["bert", "t5"])
def test_an_unsupported_model_type_is_refused_by_name(build) -> None:
    model = build()
    with pytest.raises(UnsupportedLayerError, match=r"model type '(bert|t5)'.*supported: gpt2, llama, mistral"):
        get_peft_model(model, config(target_modules="attention"))
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_more_adapter_layers_than_the_model_has_is_a_config_error() -> None:
    model = tiny("llama", layers=2)
    with pytest.raises(ConfigError, match=r"adapter_layers=3, but the model has only 2 'self_attn' modules"):
        get_peft_model(model, config(adapter_layers=3))
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())


def test_a_target_that_is_not_attention_is_refused() -> None:
    with pytest.raises(UnsupportedLayerError, match=r"model\.layers\.1\.mlp is a LlamaMLP, not an attention module"):
        get_peft_model(tiny("llama"), config(target_modules="mlp"))


def test_per_sample_adapters_with_per_sample_positions() -> None:
    """Routed rows take their own rotary positions (LayerCall.rows)."""
    model = get_peft_model(tiny("llama"), config(), adapter_name="a")
    model.add_adapter("b", config(adapter_len=2, adapter_layers=1))
    open_gates(model, seed=9)
    batch = inputs("llama", batch=3, seed=9)
    positions = torch.arange(6).repeat(3, 1) + torch.tensor([[0], [5], [2]])
    names = ["b", "__base__", "a"]
    with torch.no_grad():
        routed = model(**batch, position_ids=positions, adapter_names=names).logits
        for i, name in enumerate(names):
            one = {k: v[i : i + 1] for k, v in batch.items()}
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(**one, position_ids=positions[i : i + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(**one, position_ids=positions[i : i + 1]).logits
            assert_close(routed[i : i + 1], alone, msg=f"sample {i} routed to {name}")


def test_half_precision_base_keeps_float32_adapters() -> None:
    base = tiny("llama").to(torch.bfloat16)
    expected = logits(base, "llama")
    model = get_peft_model(base, config())
    assert all(p.dtype == torch.float32 for p in prompt_parameters(model).values())
    fresh = logits(model, "llama")
    open_gates(model)
    out = logits(model, "llama")
    assert out.dtype == torch.bfloat16
    assert_close(fresh, expected, changed_from=out, msg="closed gates in bfloat16")


def test_two_active_prompts_add_their_deltas() -> None:
    model = get_peft_model(tiny("llama"), config(adapter_len=2), adapter_name="a")
    model.add_adapter("b", config(adapter_len=4, adapter_layers=1))
    open_gates(model, seed=11)
    llama = model.base_model.model.model
    attention = llama.layers[2].self_attn
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    call = {
        "hidden_states": x,
        "attention_mask": None,
        "position_embeddings": llama.rotary_emb(x, torch.arange(5)[None]),
    }
    outputs = {}
    with torch.no_grad():
        for active in (["a"], ["b"], ["a", "b"]):
            model.set_adapter(active)
            outputs["+".join(active)] = attention(**call)[0]
        with model.disable_adapter():
            base = attention(**call)[0]
    assert_close(outputs["a+b"] - base, (outputs["a"] - base) + (outputs["b"] - base), changed_from=outputs["a"] - base)
    assert_close(outputs["a+b"] - base, (outputs["a"] - base) + (outputs["b"] - base), changed_from=outputs["b"] - base)
