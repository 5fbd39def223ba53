"""Adaption prompt beside LoRA in a mixed model, LoRA on q_proj/v_proj inside the adapted attention."""

from __future__ import annotations

import peft
import pytest
import torch
from adaption_helpers import inputs, logits, open_gates, peft_adaption_prompt, tiny
from safetensors.torch import load_file

from grafting import AdaptedLayer, AdaptionPromptConfig, LoraConfig, MergeError, PeftModel, get_peft_model
from grafting.testing import assert_close, assert_identical

PROMPT = AdaptionPromptConfig(adapter_len=3, adapter_layers=2, task_type="CAUSAL_LM")
LORA = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")


def mixed(order: str, seed: int = 0) -> torch.nn.Module:
    """Adaption prompt ("prompt") and LoRA ("lora") on one Llama, added in ``order``, both active."""
    first, second = (
        (("prompt", PROMPT), ("lora", LORA)) if order == "prompt-first" else (("lora", LORA), ("prompt", PROMPT))
    )
    model = get_peft_model(tiny("llama", seed=seed), first[1], adapter_name=first[0], mixed=True)
    model.add_adapter(second[0], second[1])
    model.set_adapter(["prompt", "lora"])
    open_gates(model, seed=seed)
    return model


def keys(folder) -> list[str]:
    return sorted(load_file(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("order", ["prompt-first", "lora-first"])
def test_mixed_model_equals_prompt_on_the_lora_merged_model(order: str, tmp_path) -> None:
    """Oracle: PEFT merges the LoRA into the weights, then PEFT's adaption prompt runs on top."""
    ours = mixed(order)
    layer = ours.base_model.model.model.layers[2].self_attn
    assert isinstance(layer, AdaptedLayer)
    assert isinstance(layer.base_layer.q_proj, AdaptedLayer)
    expected = logits(ours, "llama")
    ours.save_pretrained(tmp_path)

    merged = peft.PeftModel.from_pretrained(tiny("llama"), tmp_path / "lora").merge_and_unload()
    oracle = peft.PeftModel.from_pretrained(merged, tmp_path / "prompt")
    for alone in ("prompt", "lora"):
        only = logits(peft.PeftModel.from_pretrained(tiny("llama"), tmp_path / alone), "llama")
        assert_close(logits(oracle, "llama"), expected, changed_from=only, msg=f"mix, not {alone} alone")


@pytest.mark.parametrize("order", ["prompt-first", "lora-first"])
def test_each_adapter_saves_the_keys_it_saves_alone(order: str, tmp_path) -> None:
    mixed(order).save_pretrained(tmp_path / "mix")
    get_peft_model(tiny("llama"), LORA).save_pretrained(tmp_path / "lora")
    get_peft_model(tiny("llama"), PROMPT).save_pretrained(tmp_path / "prompt")
    assert keys(tmp_path / "mix" / "lora") == keys(tmp_path / "lora")
    assert keys(tmp_path / "mix" / "prompt") == keys(tmp_path / "prompt")
    assert not any("base_layer" in k for k in keys(tmp_path / "mix" / "lora"))


@pytest.mark.parametrize("order", ["prompt-first", "lora-first"])
def test_mixed_save_and_load_restores_the_mix(order: str, tmp_path) -> None:
    ours = mixed(order, seed=4)
    expected = logits(ours, "llama")
    ours.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny("llama", seed=4), tmp_path, mixed=True)
    assert_close(logits(loaded, "llama"), expected, changed_from=logits(tiny("llama", seed=4), "llama"))
    state = {k: v for k, v in loaded.state_dict().items() if ".adapters." in k}
    assert state.keys() == {k for k in ours.state_dict() if ".adapters." in k}


def test_merging_lora_inside_the_adapted_attention_keeps_the_outputs() -> None:
    ours = mixed("prompt-first", seed=1)
    expected = logits(ours, "llama")
    ours.merge_adapter(["lora"])
    base = logits(tiny("llama", seed=1), "llama")
    assert_close(logits(ours, "llama"), expected, changed_from=base, msg="LoRA merged")
    ours.unmerge_adapter()
    assert_close(logits(ours, "llama"), expected, changed_from=base, msg="LoRA unmerged")


def test_merging_everything_is_refused_and_changes_nothing() -> None:
    ours = mixed("lora-first", seed=2)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    expected = logits(ours, "llama")
    with pytest.raises(MergeError, match=r"self_attn.*'prompt'.*cannot be merged"):
        ours.merge_and_unload()
    assert_identical(dict(ours.state_dict()), before, msg="after the refused merge")
    assert_close(logits(ours, "llama"), expected, changed_from=logits(tiny("llama", seed=2), "llama"))


@pytest.mark.parametrize("order", ["prompt-first", "lora-first"])
def test_unload_and_delete_put_the_plain_modules_back(order: str) -> None:
    base = logits(tiny("llama"), "llama")
    ours = mixed(order)
    ours.delete_adapter("prompt")
    lora_only = get_peft_model(tiny("llama"), LORA)
    lora_only.load_state_dict(
        {k.replace(".adapters.lora.", ".adapters.default."): v for k, v in ours.state_dict().items()}, strict=False
    )
    assert_close(logits(ours, "llama"), logits(lora_only, "llama"), changed_from=base, msg="prompt deleted")
    mix = mixed(order)
    adapted = logits(mix, "llama")
    plain = mix.unload()
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    assert_close(logits(plain, "llama"), base, changed_from=adapted, msg="unloaded")


def test_per_sample_routing_through_nested_layers() -> None:
    ours = mixed("prompt-first", seed=3)
    names = ["prompt", "lora", "__base__", "prompt"]
    batch = inputs("llama", batch=4, seed=3)
    with torch.no_grad():
        routed = ours(**batch, adapter_names=names).logits
        for i, name in enumerate(names):
            with ours.disable_adapter() if name == "__base__" else _active(ours, name):
                alone = ours(**{k: v[i : i + 1] for k, v in batch.items()}).logits
            assert_close(routed[i : i + 1], alone, msg=f"sample routed to {name}")


class _active:
    def __init__(self, model, name: str) -> None:
        self.model, self.name = model, name

    def __enter__(self) -> None:
        self.model.set_adapter(self.name)

    def __exit__(self, *exc: object) -> None:
        self.model.set_adapter(["prompt", "lora"])


def test_oracle_sanity_peft_prompt_alone_differs_from_lora_merged() -> None:
    """The oracle of the first test is not trivially satisfied: the prompt changes the merged model's output."""
    merged = get_peft_model(tiny("llama"), LORA).merge_and_unload()
    before = logits(merged, "llama")
    oracle = peft_adaption_prompt(merged, adapter_len=3, adapter_layers=2)
    open_gates(oracle)
    assert_close(
        logits(oracle, "llama"), logits(oracle, "llama"), changed_from=before, msg="prompt on the merged model"
    )
