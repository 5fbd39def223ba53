"""The wrappers' API: dtypes, parameter counts, inject_adapter_in_model, task classes, mixed stacks.

On the toy methods (tests/toy_methods.py); LoRA's bfloat16 logits against PEFT's are
plugins/lora/tests/test_lora_model_api.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import grafting
from grafting.model.layer import AdaptedLayer
from grafting.testing import assert_close, assert_identical
from tests.helpers import ARCHS, LINEAR, adapter_params, base_logits, base_model, logits, randomize, state_of, toy
from tests.helpers import toy_adapted as adapted
from tests.toy_methods import ToyDeltaConfig, ToyInputConfig, ToyOutputConfig, ToyPlugin

pytestmark = pytest.mark.usefixtures("toy_methods")


# -- dtypes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_adapter_dtype_on_a_half_precision_base(arch: str, dtype: torch.dtype) -> None:
    config = toy(arch, target_modules=LINEAR[arch][:2])
    model = grafting.get_peft_model(base_model(arch).to(dtype), config)
    toy_params = {n: p for n, p in model.named_parameters() if ".toy_" in n}
    assert {p.dtype for p in toy_params.values()} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if n not in toy_params} == {dtype}  # heads copied as is
    randomize(model, 1)
    assert logits(model, arch).dtype == dtype
    plain = grafting.get_peft_model(base_model(arch).to(dtype), config, autocast_adapter_dtype=False)
    assert {p.dtype for n, p in plain.named_parameters() if ".toy_" in n} == {dtype}


def test_a_float64_base_gets_float64_adapters() -> None:
    model = grafting.get_peft_model(base_model("llama").double(), toy("llama"))
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert logits(model, "llama").dtype == torch.float64


# -- parameter counts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_get_nb_trainable_parameters(arch: str) -> None:
    model = adapted(arch, toy(arch, target_modules="all-linear", scale=0.3))
    trainable, total = model.get_nb_trainable_parameters()
    owned = adapter_params(model)
    assert trainable == sum(p.numel() for p in owned.values())
    assert total == sum(p.numel() for p in base_model(arch).parameters()) + trainable
    model.add_adapter("second", toy(arch, scale=0.2))  # inactive: counted in all, not in trainable
    trainable_after, total_after = model.get_nb_trainable_parameters()
    assert trainable_after == trainable
    assert total_after == total + sum(p.numel() for p in adapter_params(model, "second").values())


def test_print_trainable_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    model = adapted("llama", toy("llama", scale=0.2))
    trainable, total = model.get_nb_trainable_parameters()
    model.print_trainable_parameters()
    assert capsys.readouterr().out == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}\n"
    )


# -- inject_adapter_in_model ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_inject_adapter_in_model(arch: str) -> None:
    model = base_model(arch)
    config = toy(arch, target_modules="all-linear", task_type=None)
    returned = grafting.inject_adapter_in_model(config, model)
    assert returned is model
    layers = {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}
    assert layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(".adapters.default.toy_" in n for n in trainable)
    # the same adapters through get_peft_model give the same output
    wrapped = adapted(arch, config)
    for path, layer in wrapped.base_model.adapted_layers():
        layer.adapters["default"].load_state_dict(layers[path].adapters["default"].state_dict())
    assert_close(logits(model, arch), logits(wrapped, arch), changed_from=base_logits(arch), msg="injected vs wrapped")


# -- task classes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("task_type", "klass"),
    [
        (None, grafting.PeftModel),
        ("CAUSAL_LM", grafting.PeftModelForCausalLM),
        ("SEQ_2_SEQ_LM", grafting.PeftModelForSeq2SeqLM),
        ("SEQ_CLS", grafting.PeftModelForSequenceClassification),
        ("TOKEN_CLS", grafting.PeftModelForTokenClassification),
        ("QUESTION_ANS", grafting.PeftModelForQuestionAnswering),
        ("FEATURE_EXTRACTION", grafting.PeftModelForFeatureExtraction),
    ],
)
def test_task_class_follows_task_type(task_type: str | None, klass: type, tmp_path: Path) -> None:
    base = _model_for(task_type)
    config = ToyDeltaConfig(task_type=task_type, target_modules=["query", "value"])
    model = grafting.get_peft_model(base, config)
    assert type(model) is klass
    model.save_pretrained(tmp_path)
    assert type(grafting.PeftModel.from_pretrained(_model_for(task_type), tmp_path)) is klass
    heads = {"SEQ_CLS": "classifier", "TOKEN_CLS": "classifier", "QUESTION_ANS": "qa_outputs"}
    saved = [p for p, _ in model.base_model.save_wrappers()]
    assert saved == ([heads[task_type]] if task_type in heads else [])


def _model_for(task_type: str | None) -> nn.Module:
    from transformers import BertConfig, BertForQuestionAnswering, BertForTokenClassification, BertModel

    config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    torch.manual_seed(0)
    if task_type == "TOKEN_CLS":
        return BertForTokenClassification(config).eval()
    if task_type == "QUESTION_ANS":
        return BertForQuestionAnswering(config).eval()
    if task_type == "SEQ_CLS":
        return base_model("bert")
    return BertModel(config).eval()


def test_a_class_asked_for_is_kept(tmp_path: Path) -> None:
    adapted("llama").save_pretrained(tmp_path)
    loaded = grafting.PeftModelForFeatureExtraction.from_pretrained(base_model("llama"), tmp_path)
    assert type(loaded) is grafting.PeftModelForFeatureExtraction


def test_the_wrapper_forwards_attributes_to_the_model() -> None:
    base = base_model("llama")
    model = grafting.get_peft_model(base, toy("llama"))
    assert model.get_base_model() is base
    assert model.config is base.config
    assert model.active_peft_config is model.peft_config["default"]


# -- a mixed stack on one layer ------------------------------------------------------------------------------
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _mixed(toy_methods: ToyPlugin, reads_base_weight: bool = False) -> Any:
    """A float64 mixed stack: "default" (a delta that may read the layer's own weight, as DoRA does), another
    delta, an output and an input adapter on the same layers."""
    default = ToyDeltaConfig(target_modules=TARGETS, scale=0.1, reads_base_weight=reads_base_weight)
    model = grafting.get_peft_model(base_model("llama", torch.float64), default, mixed=True)
    model.add_adapter("delta", ToyDeltaConfig(target_modules=TARGETS, scale=0.05))
    model.add_adapter("out", ToyOutputConfig(target_modules=TARGETS))
    model.add_adapter("in", ToyInputConfig(target_modules=TARGETS))
    randomize(model, 1, adapter_name="default")
    model.set_adapter(["default", "delta", "out", "in"])
    return model


def test_a_mixed_stack_merges_to_its_forward(toy_methods: ToyPlugin) -> None:
    model = _mixed(toy_methods)
    assert type(model) is grafting.PeftMixedModel
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert list(layer.adapters) == ["default", "delta", "out", "in"]
    out = logits(model, "llama")
    base = base_logits("llama", dtype=torch.float64)
    # merged sets must be a prefix of INPUT < DELTA < OUTPUT
    for refused in (["default"], ["out"], ["default", "delta", "out"]):
        before = state_of(model)
        with pytest.raises(grafting.MergeError, match="stays unmerged"):
            model.merge_adapter(refused)
        assert_identical(state_of(model), before, msg=f"after the refused merge of {refused}")
    model.merge_adapter(["in"])
    assert layer.merged == ["in"]
    assert_close(logits(model, "llama"), out, changed_from=base, msg="input adapter merged")
    model.merge_adapter(["default", "delta"])
    assert layer.merged == ["in", "default", "delta"]
    assert_close(logits(model, "llama"), out, changed_from=base, msg="input and delta adapters merged")
    plain = model.merge_and_unload()
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    assert_close(logits(plain, "llama"), out, changed_from=base, msg="merged and unloaded")


def test_an_adapter_reading_the_weight_does_not_merge_beside_an_input_adapter(toy_methods: ToyPlugin) -> None:
    model = _mixed(toy_methods, reads_base_weight=True)
    out = logits(model, "llama")
    before = state_of(model)
    with pytest.raises(grafting.MergeError, match="own weight"):
        model.merge_adapter()
    assert_identical(state_of(model), before, msg="after the refused merge")
    model.set_adapter(["default", "delta", "out"])  # without the input adapter it merges
    out = logits(model, "llama")
    model.merge_adapter()
    base = base_logits("llama", dtype=torch.float64)
    assert_close(logits(model, "llama"), out, changed_from=base, msg="weight reader, delta and output merged")


def test_a_mixed_model_saves_and_loads_back(toy_methods: ToyPlugin, tmp_path: Path) -> None:
    model = _mixed(toy_methods)
    out = logits(model, "llama")
    model.save_pretrained(tmp_path)
    loaded = grafting.PeftModel.from_pretrained(base_model("llama", torch.float64), tmp_path, mixed=True)
    assert sorted(loaded.active_adapters) == ["default", "delta", "in", "out"]
    base = base_logits("llama", dtype=torch.float64)
    assert_close(logits(loaded, "llama"), out, changed_from=base, msg="mixed model reloaded")
    with loaded.disable_adapter():
        assert_close(logits(loaded, "llama"), base, changed_from=out, msg="mixed model disabled")


def test_methods_do_not_mix_outside_a_mixed_model(toy_methods: ToyPlugin) -> None:
    model = adapted("llama")
    with pytest.raises(grafting.AdapterStateError, match="mixed"):
        model.add_adapter("toy", ToyOutputConfig(target_modules=["q_proj"]))
    assert list(model.peft_config) == ["default"]
