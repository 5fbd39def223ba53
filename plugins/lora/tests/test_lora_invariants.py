"""LoRA invariants on the four architectures, over random small configs.

Disabled adapters and fresh adapters give the base output; merging keeps the
output and unmerging restores the weights (up to rounding, grafting.testing.assert_close); training touches adapter
parameters only; several adapters switch, stack, and go away cleanly.
"""

from __future__ import annotations

import copy
from typing import Any

import attrs
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lora_model_helpers import (
    ARCHS,
    UNTIED_EMBEDDING,
    adapted,
    adapter_params,
    base_logits,
    base_model,
    logits,
    lora_configs,
    loss_inputs,
    randomize,
    state_of,
)
from torch import nn

import grafting
from grafting.io.state_dict import get_peft_model_state_dict, set_peft_model_state_dict
from grafting.model.layer import AdaptedLayer
from grafting.model.modules_to_save import ModulesToSaveWrapper
from grafting.testing import assert_close, assert_identical


def _base_weights(model: Any) -> dict[str, torch.Tensor]:
    """The base model's tensors under their original names (wrappers looked through)."""
    out = {}
    for key, value in model.get_base_model().state_dict().items():
        if ".adapters." in key or ".modules_to_save." in key:
            continue
        out[key.replace(".base_layer.", ".").replace(".original_module.", ".")] = value.detach().clone()
    return out


F64 = torch.float64  # merges are checked in float64 (see helpers.base_model)


def _model(arch: str, config: Any, seed: int = 1, dtype: torch.dtype | None = None) -> Any:
    model = adapted(arch, config, dtype=dtype)
    randomize(model, seed)
    return model


# -- identity -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@given(data=st.data())
def test_disabled_adapter_gives_the_base_output(arch: str, data: st.DataObject) -> None:
    model = _model(arch, data.draw(lora_configs(arch)))
    out = logits(model, arch)
    with model.disable_adapter():
        assert_close(logits(model, arch), base_logits(arch), changed_from=out, msg="disabled adapter")
    assert_close(logits(model, arch), out, changed_from=base_logits(arch), msg="after the disabled block")


@pytest.mark.parametrize("arch", ARCHS)
@given(data=st.data(), init=st.sampled_from([True, "gaussian"]))
def test_a_fresh_adapter_gives_the_base_output(arch: str, data: st.DataObject, init: Any) -> None:
    config = data.draw(lora_configs(arch, init_lora_weights=init))
    model = adapted(arch, config)
    fresh = logits(model, arch)
    assert adapter_params(model)
    randomize(model, 1)  # the same adapters, no longer fresh, do move the output
    assert_close(fresh, base_logits(arch), changed_from=logits(model, arch), msg="fresh adapter")


# -- merging ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@given(data=st.data(), safe=st.booleans())
def test_merged_equals_unmerged_and_unmerge_restores_the_weights(arch: str, data: st.DataObject, safe: bool) -> None:
    # merging into an embedding tied to the output head changes the head too (as in PEFT): untied only
    model = _model(arch, data.draw(lora_configs(arch, embeddings=arch in UNTIED_EMBEDDING)), dtype=F64)
    original = _base_weights(model)
    out = logits(model, arch)
    model.merge_adapter(safe_merge=safe)
    assert all(layer.merged == ["default"] for _, layer in model.base_model.adapted_layers())
    base = base_logits(arch, dtype=F64)
    assert_close(logits(model, arch), out, changed_from=base, msg="merged")
    with model.disable_adapter():
        assert_close(logits(model, arch), base, changed_from=out, msg="disabled while merged")
    assert_close(logits(model, arch), out, changed_from=base, msg="merged again after the disabled block")
    model.unmerge_adapter()
    assert all(layer.merged == [] for _, layer in model.base_model.adapted_layers())
    restored = _base_weights(model)
    for key, value in original.items():
        assert_close(restored[key], value, rtol=1e-12, atol=1e-12, msg=f"unmerged {key}")  # float64: W + d - d
    assert_close(logits(model, arch), out, changed_from=base, msg="unmerged")


@pytest.mark.parametrize("arch", ARCHS)
@given(data=st.data(), safe=st.booleans())
def test_merge_and_unload_gives_a_plain_model_with_the_same_output(arch: str, data: st.DataObject, safe: bool) -> None:
    model = _model(arch, data.draw(lora_configs(arch, embeddings=arch in UNTIED_EMBEDDING)), dtype=F64)
    out = logits(model, arch)
    plain = model.merge_and_unload(safe_merge=safe)
    assert type(plain) is type(base_model(arch))
    assert not any(isinstance(m, (AdaptedLayer, ModulesToSaveWrapper)) for m in plain.modules())
    assert sorted(plain.state_dict()) == sorted(base_model(arch).state_dict())
    assert_close(logits(plain, arch), out, changed_from=base_logits(arch, dtype=F64), msg="merged and unloaded")


@pytest.mark.parametrize("arch", ARCHS)
@given(data=st.data())
def test_unload_gives_back_the_base_model(arch: str, data: st.DataObject) -> None:
    model = _model(arch, data.draw(lora_configs(arch)), dtype=F64)
    out = logits(model, arch)
    model.merge_adapter()
    plain = model.unload()
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    assert sorted(plain.state_dict()) == sorted(base_model(arch).state_dict())
    assert_close(logits(plain, arch), base_logits(arch, dtype=F64), changed_from=out, msg="unloaded")


def test_safe_merge_refuses_non_finite_weights_and_changes_nothing() -> None:
    model = _model("llama", grafting.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.adapters["default"].lora_B.weight[0, 0] = float("inf")
    before = state_of(model)
    with pytest.raises(grafting.MergeError, match="non-finite"):
        model.merge_adapter(safe_merge=True)
    assert_identical(state_of(model), before, msg="after the refused merge")
    assert all(not layer.merged for _, layer in model.base_model.adapted_layers())


# -- training ---------------------------------------------------------------------------------------------
def _train(model: nn.Module, arch: str, steps: int = 3) -> None:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    batch = loss_inputs(arch)
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("arch", ARCHS)
@given(data=st.data(), dropout=st.sampled_from([0.0, 0.1]))
def test_training_changes_adapter_parameters_only(arch: str, data: st.DataObject, dropout: float) -> None:
    model = _model(arch, data.draw(lora_configs(arch, lora_dropout=dropout, bias="none")))
    owned = set(adapter_params(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == owned
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, arch)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= owned, sorted(changed - owned)[:3]
    assert any(".lora_A" in n or ".lora_embedding_A" in n for n in changed)
    assert any(".lora_B" in n or ".lora_embedding_B" in n for n in changed)


@pytest.mark.parametrize(("bias", "arch"), [("all", "bert"), ("lora_only", "bert"), ("all", "gpt2")])
def test_bias_training_trains_the_chosen_biases_too(bias: str, arch: str) -> None:
    from lora_model_helpers import lora

    model = _model(arch, lora(arch, bias=bias))
    owned = set(adapter_params(model))
    biases = {n for n, p in model.named_parameters() if p.requires_grad} - owned
    assert biases
    assert all(n.endswith("bias") for n in biases)
    if bias == "lora_only":
        assert all(".base_layer.bias" in n for n in biases)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, arch)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= owned | biases
    assert changed & biases


def test_inference_mode_trains_nothing() -> None:
    model = adapted("llama", inference_mode=True)
    assert not any(p.requires_grad for p in model.parameters())
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 0
    assert total > 0


# -- several adapters ---------------------------------------------------------------------------------------
def _two_doras_on_a_layer(model: Any) -> bool:
    return any(
        sum(getattr(a, "use_dora", False) for a in layer.adapters.values()) > 1
        for _, layer in model.base_model.adapted_layers()
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_a_lora_and_a_dora_on_one_layer_merge_to_their_sum(arch: str) -> None:
    from lora_model_helpers import LINEAR, lora

    model = adapted(arch, lora(arch, target_modules=LINEAR[arch], r=3), dtype=F64)
    # one trained copy of a task head per active set (PEFT refuses two): the second adapter trains none
    model.add_adapter(
        "dora", attrs.evolve(lora(arch, use_dora=True, r=2), task_type=None)
    )  # added second, merged first
    randomize(model, 4)
    model.set_adapter(["default", "dora"])
    out = logits(model, arch)
    model.merge_adapter()
    base = base_logits(arch, dtype=F64)
    assert_close(logits(model, arch), out, changed_from=base, msg="LoRA + DoRA merged")
    model.unmerge_adapter()
    assert_close(logits(model, arch), out, changed_from=base, msg="LoRA + DoRA unmerged again")


def _single(arch: str, config: Any, model: Any, name: str) -> torch.Tensor:
    """The output of a model that holds only adapter ``name`` of ``model`` (same weights)."""
    alone = adapted(arch, config, dtype=F64)
    set_peft_model_state_dict(alone, get_peft_model_state_dict(model, adapter_name=name))
    return logits(alone, arch)


@pytest.mark.parametrize("arch", ARCHS)
@given(data=st.data())
def test_switching_adding_and_deleting_adapters(arch: str, data: st.DataObject) -> None:
    # merging into an embedding tied to the output head changes the head too (as in PEFT): untied only
    first = data.draw(lora_configs(arch, embeddings=arch in UNTIED_EMBEDDING))
    second = data.draw(lora_configs(arch, embeddings=arch in UNTIED_EMBEDDING))
    model = _model(arch, first, dtype=F64)
    out_first = logits(model, arch)

    model.add_adapter("second", second)
    randomize(model, 2, adapter_name="second")
    assert model.active_adapters == ["default"]
    base = base_logits(arch, dtype=F64)
    assert_close(logits(model, arch), out_first, changed_from=base, msg="the new adapter is not active yet")
    assert all(not p.requires_grad for p in adapter_params(model, "second").values())

    model.set_adapter("second")
    out_second = logits(model, arch)
    assert_close(out_second, _single(arch, second, model, "second"), changed_from=out_first, msg="second active")
    assert all(p.requires_grad for p in adapter_params(model, "second").values())
    assert all(not p.requires_grad for p in adapter_params(model, "default").values())

    model.set_adapter("default")
    assert_close(logits(model, arch), out_first, changed_from=out_second, msg="back to the first adapter")

    stacked = copy.deepcopy(model)  # merging and unmerging leaves rounding residue: on a copy
    shared_copies = [
        w for _, w in stacked.base_model.save_wrappers() if {"default", "second"} <= set(w.modules_to_save)
    ]
    if shared_copies:  # each trains its own copy of one module (the task head): refused together, as PEFT
        with pytest.raises(grafting.ActiveAdaptersError, match="Only one adapter can be set"):
            stacked.set_adapter(["default", "second"])
        assert stacked.active_adapters == ["default"]
    else:
        stacked.set_adapter(["default", "second"])
        both = logits(stacked, arch)
        if _two_doras_on_a_layer(stacked):  # each DoRA merge needs the layer's own weight
            before = state_of(stacked)
            with pytest.raises(grafting.MergeError, match="own weight"):
                stacked.merge_adapter()
            assert_identical(state_of(stacked), before, msg="after the refused merge")
            assert_close(logits(stacked, arch), both, changed_from=out_first, msg="both adapters, merge refused")
        else:
            stacked.merge_adapter()
            assert_close(logits(stacked, arch), both, changed_from=out_first, msg="both adapters merged")

    model.delete_adapter("default")
    assert list(model.peft_config) == ["second"]
    assert model.active_adapters == ["second"]
    assert not adapter_params(model, "default")
    assert_close(logits(model, arch), out_second, changed_from=out_first, msg="after deleting the first adapter")

    model.delete_adapter("second")
    assert not model.peft_config
    assert not any(isinstance(m, (AdaptedLayer, ModulesToSaveWrapper)) for m in model.modules())
    assert_close(logits(model, arch), base, changed_from=out_second, msg="every adapter deleted")


def test_unknown_adapter_names() -> None:
    model = adapted("llama")
    with pytest.raises(grafting.AdapterNotFoundError, match="nope"):
        model.set_adapter("nope")
    with pytest.raises(grafting.AdapterNotFoundError, match="nope"):
        model.delete_adapter("nope")
    with pytest.raises(grafting.AdapterNotFoundError, match="nope"):
        model.merge_adapter(["nope"])
    assert model.active_adapters == ["default"]
