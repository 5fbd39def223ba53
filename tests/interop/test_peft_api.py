"""PEFT's public API in grafting: names, signatures, enums, errors, return values, trainability (peft is the oracle)."""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import grafting
from grafting.testing import assert_close, tiny_llama
from tests.helpers import base_model, logits, lora, randomize

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import peft

#: Names of PEFT 0.21's ``__all__`` that grafting leaves out on purpose, by reason (README: "Differences from PEFT").
#: ``XxxConfig``/``XxxModel`` of a method grafting does not implement are left out too (see ``_absent_reason``).
ABSENT: dict[str, str] = {
    **dict.fromkeys(
        [
            "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
            "PEFT_TYPE_TO_CONFIG_MAPPING",
            "PEFT_TYPE_TO_MIXED_MODEL_MAPPING",
            "PEFT_TYPE_TO_TUNER_MAPPING",
            "TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING",
            "bloom_model_postprocess_past_key_value",
        ],
        "PEFT's internal dispatch tables; grafting dispatches through its plugin registry",
    ),
    **dict.fromkeys(
        ["LoraModel", "LoHaModel", "IA3Model", "AdaptionPromptModel"],
        "one method-agnostic tuner (grafting.model.tuner.AdapterModel) instead of one per method",
    ),
    **dict.fromkeys(
        [
            "PrefixEncoder",
            "PromptEmbedding",
            "PromptEncoder",
            "PromptEncoderReparameterizationType",
            "PromptLearningConfig",
            "MultitaskPromptTuningInit",
            "CPTEmbedding",
            "CartridgeEncoder",
        ],
        "the prefix plugin's own modules and option values (strings), not core names",
    ),
    **dict.fromkeys(
        [
            "compose_cartridge_adapters",
            "create_arrow_model",
            "find_kappa_target_modules",
            "initialize_kv_prefix_from_past_key_values",
            "initialize_kv_prefix_from_text",
            "prompt_embeddings_from_past_key_values",
            "preprocess_loraga",
            "LoraRuntimeConfig",
        ],
        "helpers of methods or initializations grafting does not implement",
    ),
    "shift_tokens_right": "a transformers utility PEFT re-exports (transformers.models.bart.modeling_bart)",
}


def _absent_reason(name: str) -> str | None:
    if name in ABSENT:
        return ABSENT[name]
    for suffix in ("Config", "Model"):
        method = name.removesuffix(suffix)
        if name.endswith(suffix) and not hasattr(grafting, method + "Config"):
            return "a method grafting does not implement"
    if name.endswith("Model"):  # a method grafting implements: its tuner is AdapterModel
        return ABSENT["LoraModel"]
    return None


def test_every_peft_name_is_in_grafting_or_documented_absent() -> None:
    unexplained = [n for n in peft.__all__ if not hasattr(grafting, n) and _absent_reason(n) is None]
    assert unexplained == []
    wrongly_absent = [n for n in ABSENT if hasattr(grafting, n)]
    assert wrongly_absent == []


def _peft_names() -> list[str]:
    return list(peft.__all__)


def _parameters(fn: Any) -> list[tuple[str, Any, Any]]:
    """(name, default, kind) of each parameter; a function default by its name (each library has its own)."""
    return [
        (p.name, p.default.__name__ if inspect.isfunction(p.default) else p.default, p.kind)
        for p in inspect.signature(fn).parameters.values()
    ]


def assert_peft_signature(peft_fn: Any, graft_fn: Any, what: str) -> None:
    """grafting's parameters start with PEFT's (names, defaults, kinds); any extra one is keyword-only or optional."""
    theirs, ours = _parameters(peft_fn), _parameters(graft_fn)
    has_var_kw = any(kind is inspect.Parameter.VAR_KEYWORD for _, _, kind in theirs)
    positional = [p for p in theirs if p[2] is not inspect.Parameter.VAR_KEYWORD]
    assert ours[: len(positional)] == positional, f"{what}: PEFT {theirs}\n grafting {ours}"
    for name, default, kind in ours[len(positional) :]:
        assert kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD) or (
            default is not inspect.Parameter.empty
        ), f"{what}: grafting's extra parameter {name} is required"
    if has_var_kw:
        assert any(kind is inspect.Parameter.VAR_KEYWORD for _, _, kind in ours), f"{what}: PEFT takes **kwargs"


# -- names and signatures ------------------------------------------------------------------------------
SIGNATURES = [
    ("PeftModel.add_adapter", peft.PeftModel.add_adapter, grafting.PeftModel.add_adapter),
    ("PeftModel.load_adapter", peft.PeftModel.load_adapter, grafting.PeftModel.load_adapter),
    ("PeftModel.from_pretrained", peft.PeftModel.from_pretrained, grafting.PeftModel.from_pretrained),
    ("PeftModel.set_adapter", peft.PeftModel.set_adapter, grafting.PeftModel.set_adapter),
    ("PeftModel.set_requires_grad", peft.PeftModel.set_requires_grad, grafting.PeftModel.set_requires_grad),
    ("PeftModel.delete_adapter", peft.PeftModel.delete_adapter, grafting.PeftModel.delete_adapter),
    (
        "PeftModel.supports_lora_conversion",
        peft.PeftModel.supports_lora_conversion,
        grafting.PeftModel.supports_lora_conversion,
    ),
    (
        "PeftModel.prepare_model_for_gradient_checkpointing",
        peft.PeftModel.prepare_model_for_gradient_checkpointing,
        grafting.PeftModel.prepare_model_for_gradient_checkpointing,
    ),
    ("PeftMixedModel.add_adapter", peft.PeftMixedModel.add_adapter, grafting.PeftMixedModel.add_adapter),
    ("PeftMixedModel.set_adapter", peft.PeftMixedModel.set_adapter, grafting.PeftMixedModel.set_adapter),
    ("PeftMixedModel.delete_adapter", peft.PeftMixedModel.delete_adapter, grafting.PeftMixedModel.delete_adapter),
    ("PeftConfig.from_pretrained", peft.PeftConfig.from_pretrained, grafting.PeftConfig.from_pretrained),
    ("PeftConfig.from_json_file", peft.PeftConfig.from_json_file, grafting.PeftConfig.from_json_file),
    ("PeftConfig.save_pretrained", peft.PeftConfig.save_pretrained, grafting.PeftConfig.save_pretrained),
    ("PeftConfig.from_peft_type", peft.PeftConfig.from_peft_type, grafting.PeftConfig.from_peft_type),
    ("inject_adapter_in_model", peft.inject_adapter_in_model, grafting.inject_adapter_in_model),
    ("get_peft_model", peft.get_peft_model, grafting.get_peft_model),
    ("get_peft_model_state_dict", peft.get_peft_model_state_dict, grafting.get_peft_model_state_dict),
    ("set_peft_model_state_dict", peft.set_peft_model_state_dict, grafting.set_peft_model_state_dict),
    ("LoraModel.set_adapter", peft.LoraModel.set_adapter, grafting.model.tuner.AdapterModel.set_adapter),
    ("LoraModel.delete_adapter", peft.LoraModel.delete_adapter, grafting.model.tuner.AdapterModel.delete_adapter),
    (
        "LoraModel.set_requires_grad",
        peft.LoraModel.set_requires_grad,
        grafting.model.tuner.AdapterModel.set_requires_grad,
    ),
]


@pytest.mark.parametrize(("what", "theirs", "ours"), SIGNATURES, ids=[s[0] for s in SIGNATURES])
def test_signature_is_peft_s(what: str, theirs: Any, ours: Any) -> None:
    assert_peft_signature(theirs, ours, what)


def test_module_functions_shared_with_peft_have_its_signature() -> None:
    checked = 0
    for name in _peft_names():
        theirs = getattr(peft, name)
        if inspect.isfunction(theirs) and hasattr(grafting, name):
            assert_peft_signature(theirs, getattr(grafting, name), name)
            checked += 1
    assert checked >= 10


# -- PeftType ------------------------------------------------------------------------------------------------
def test_peft_type_is_peft_s_enum() -> None:
    assert [(m.name, m.value) for m in grafting.PeftType] == [(m.name, m.value) for m in peft.PeftType]
    assert issubclass(grafting.PeftType, str)
    config = lora("llama")
    assert isinstance(config.peft_type, grafting.PeftType)
    assert config.peft_type is grafting.PeftType.LORA
    assert config.peft_type == "LORA" == peft.LoraConfig().peft_type
    assert config.peft_type.value == peft.LoraConfig().peft_type.value
    assert json.loads(config.to_json_string())["peft_type"] == "LORA"
    assert type(config.to_dict()["peft_type"]) is str


def test_a_method_outside_peft_s_enum_keeps_its_string(toy_methods: Any) -> None:
    from tests.toy_methods import ToyDeltaConfig

    config = ToyDeltaConfig(target_modules=["q_proj"])
    assert type(config.peft_type) is str
    assert config.peft_type == "TOY_DELTA"
    model = grafting.get_peft_model(base_model("llama"), config)
    assert model.peft_config["default"].peft_type == "TOY_DELTA"


# -- errors ---------------------------------------------------------------------------------------------------
def test_unknown_adapter_is_a_value_error_as_in_peft() -> None:
    ours = grafting.get_peft_model(base_model("llama"), lora("llama"))
    theirs = peft.get_peft_model(base_model("llama"), peft.LoraConfig(target_modules=["q_proj", "v_proj"]))
    for model in (ours, theirs):
        with pytest.raises(ValueError, match="missing"):
            model.set_adapter("missing")
        with pytest.raises(ValueError, match="missing"):
            model.delete_adapter("missing")
    with pytest.raises(KeyError, match="missing"):  # still a lookup error too
        ours.set_adapter("missing")
    with pytest.raises(grafting.AdapterNotFoundError, match="missing"):
        ours.set_adapter("missing")


# -- trainability (PEFT: set_adapter trains, is_trainable trains even when inactive) ----------------------------
def _trains(model: Any, name: str) -> tuple[bool, bool]:
    flags = [p.requires_grad for n, p in model.named_parameters() if f".{name}." in n and ".lora_" in n]
    assert flags, f"no parameters of adapter {name}"
    return all(flags), any(flags)


def _trainability_story(lib: Any, folder: Path) -> list[tuple[str, tuple[bool, bool]]]:
    cfg = lib.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    model = lib.get_peft_model(base_model("llama"), cfg)
    model.save_pretrained(folder)
    story = [("default after get_peft_model", _trains(model, "default"))]
    model.add_adapter("b", lib.LoraConfig(r=2, target_modules=["q_proj"]))
    story.append(("b added (inactive)", _trains(model, "b")))
    model.load_adapter(folder, "c", is_trainable=True)
    story.append(("c loaded trainable (inactive)", _trains(model, "c")))
    model.load_adapter(folder, "d")
    story.append(("d loaded frozen", _trains(model, "d")))
    model.set_adapter("d")
    story += [("d after set_adapter", _trains(model, "d")), ("default after d set", _trains(model, "default"))]
    model.set_adapter("b", inference_mode=True)
    story.append(("b set in inference mode", _trains(model, "b")))
    model.set_requires_grad("c", requires_grad=False)
    story.append(("c after set_requires_grad(False)", _trains(model, "c")))
    loaded = lib.PeftModel.from_pretrained(base_model("llama"), folder, is_trainable=True)
    story.append(("from_pretrained is_trainable", _trains(loaded, "default")))
    loaded = lib.PeftModel.from_pretrained(base_model("llama"), folder)
    story.append(("from_pretrained frozen", _trains(loaded, "default")))
    return story


def test_trainability_follows_peft(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = _trainability_story(peft, tmp_path / "peft")
    assert _trainability_story(grafting, tmp_path / "grafting") == expected


# -- loading -------------------------------------------------------------------------------------------------------
def test_load_adapter_returns_the_load_result(tmp_path: Path) -> None:
    model = grafting.get_peft_model(base_model("llama"), lora("llama"))
    model.save_pretrained(tmp_path)
    result = model.load_adapter(tmp_path, "other")
    missing, unexpected = result  # a named tuple, as torch's (and so PEFT's) result
    assert result.missing_keys == missing == []
    assert result.unexpected_keys == unexpected == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(base_model("llama"), tmp_path).load_adapter(tmp_path, "other")
    assert theirs.unexpected_keys == []
    assert not [k for k in theirs.missing_keys if "lora_" in k]


def test_load_adapter_non_strict_reports_what_did_not_fit(tmp_path: Path) -> None:
    model = grafting.get_peft_model(base_model("llama"), lora("llama"))
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    tensors["base_model.model.nowhere.lora_A.weight"] = torch.zeros(2, 2)
    save_file(tensors, path)
    result = model.load_adapter(tmp_path, "other", strict=False)
    assert result.unexpected_keys == ["base_model.model.nowhere.lora_A.weight"]
    assert result.missing_keys == [dropped]


def test_from_pretrained_keeps_the_config_object(tmp_path: Path) -> None:
    grafting.get_peft_model(base_model("llama"), lora("llama")).save_pretrained(tmp_path)
    config = grafting.PeftConfig.from_pretrained(tmp_path)
    model = grafting.PeftModel.from_pretrained(base_model("llama"), tmp_path, config=config, is_trainable=True)
    assert model.peft_config["default"] is config
    assert config.inference_mode is False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_config = peft.PeftConfig.from_pretrained(tmp_path)
        theirs = peft.PeftModel.from_pretrained(base_model("llama"), tmp_path, config=theirs_config)
    assert theirs.peft_config["default"] is theirs_config  # the behaviour matched


def test_key_mapping_renames_saved_keys(tmp_path: Path) -> None:
    model = grafting.get_peft_model(base_model("llama"), lora("llama"))
    randomize(model)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    path = tmp_path / "adapter_model.safetensors"
    save_file({k.replace("model.layers.", "model.blocks."): v for k, v in load_file(path).items()}, path)
    with pytest.raises(grafting.AdapterLoadError):
        grafting.PeftModel.from_pretrained(base_model("llama"), tmp_path)
    loaded = grafting.PeftModel.from_pretrained(
        base_model("llama"), tmp_path, key_mapping={r"^model\.blocks\.": "model.layers."}
    )
    assert_close(logits(loaded, "llama"), logits(model, "llama"), changed_from=logits(base_model("llama"), "llama"))


# -- adapters: active_adapter, delete with a list, lora conversion -------------------------------------------------
def test_base_model_active_adapter_is_peft_s() -> None:
    ours = grafting.get_peft_model(base_model("llama"), lora("llama"))
    theirs = peft.get_peft_model(base_model("llama"), peft.LoraConfig(target_modules=["q_proj", "v_proj"]))
    assert ours.base_model.active_adapter == theirs.base_model.active_adapter == ["default"]
    assert ours.active_adapter == theirs.active_adapter == "default"
    for model, lib in ((ours, grafting), (theirs, peft)):
        model.add_adapter("b", lib.LoraConfig(target_modules=["q_proj"]))
        model.base_model.set_adapter(["default", "b"])
    assert ours.base_model.active_adapter == theirs.base_model.active_adapter == ["default", "b"]
    assert ours.active_adapters == theirs.active_adapters


def test_delete_adapter_takes_a_list_all_or_nothing() -> None:
    model = grafting.get_peft_model(base_model("llama"), lora("llama"), mixed=True)
    for name in ("b", "c"):
        model.add_adapter(name, lora("llama"))
    with pytest.raises(ValueError, match="nope"):
        model.delete_adapter(["b", "nope"])
    assert sorted(model.peft_config) == ["b", "c", "default"]
    model.delete_adapter(["b", "c"])
    assert list(model.peft_config) == ["default"]
    assert not [n for n in model.state_dict() if ".b." in n or ".c." in n]
    theirs = peft.get_peft_model(base_model("llama"), peft.LoraConfig(target_modules=["q_proj"]), mixed=True)
    theirs.add_adapter("b", peft.LoraConfig(target_modules=["q_proj"]))
    theirs.delete_adapter(["b"])
    assert list(theirs.peft_config) == ["default"]


@pytest.mark.parametrize("kind", ["lora", "dora", "loha", "ia3"])
def test_supports_lora_conversion_as_peft(kind: str) -> None:
    if kind == "ia3":
        ours_cfg = grafting.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])
    elif kind == "loha":
        ours_cfg = grafting.LoHaConfig(target_modules=["q_proj"])
    else:
        ours_cfg = lora("llama", use_dora=kind == "dora")
    from tests.helpers import peft_config

    ours = grafting.get_peft_model(base_model("llama"), ours_cfg)
    theirs = peft.get_peft_model(base_model("llama"), peft_config(ours_cfg))
    assert ours.supports_lora_conversion() == theirs.supports_lora_conversion()
    assert ours.supports_lora_conversion() is (kind != "ia3")


# -- configs ----------------------------------------------------------------------------------------------------
def test_config_helpers_as_peft(tmp_path: Path) -> None:
    config = lora("llama", r=4)
    config.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    assert grafting.LoraConfig.from_json_file(path) == peft.LoraConfig.from_json_file(path)
    assert config.is_prompt_learning is peft.LoraConfig().is_prompt_learning is False
    prompt = grafting.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    assert (
        prompt.is_prompt_learning
        is peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3).is_prompt_learning
    )
    assert prompt.is_prompt_learning is True
    assert grafting.PeftConfig.from_peft_type(peft_type="LORA", r=4) == grafting.LoraConfig(r=4)


def test_prompt_encoder_holds_the_prompt_learning_adapters() -> None:
    config = grafting.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    model = grafting.get_peft_model(base_model("llama"), config)
    assert list(model.prompt_encoder) == ["default"]
    assert sum(p.numel() for p in model.prompt_encoder["default"].parameters()) == 3 * 16


# -- inject_adapter_in_model ----------------------------------------------------------------------------------
def test_injected_model_state_dict_round_trip_as_peft() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.inject_adapter_in_model(
            peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), base_model("llama")
        )
    for name, p in theirs.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    state = peft.get_peft_model_state_dict(theirs)
    ours = grafting.inject_adapter_in_model(lora("llama", r=2), base_model("llama"))
    assert isinstance(ours, type(theirs))
    assert sorted(grafting.get_peft_model_state_dict(ours)) == sorted(state)
    result = grafting.set_peft_model_state_dict(ours, state)
    assert result.unexpected_keys == []
    assert result.missing_keys == []
    assert_close(logits(ours, "llama"), logits(theirs, "llama"), changed_from=logits(base_model("llama"), "llama"))
    base_keys = {k for k in theirs.state_dict() if "lora_" not in k}
    assert base_keys == {k for k in ours.state_dict() if "lora_" not in k}  # the base's keys as PEFT leaves them
    assert "default" in ours.peft_config


def test_inject_with_low_cpu_mem_usage_and_a_state_dict() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["k_proj"]), base_model("llama"))
    for name, p in theirs.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    state = peft.get_peft_model_state_dict(theirs)
    with pytest.warns(RuntimeWarning, match="state_dict"):  # the config names q_proj, the keys k_proj: as PEFT
        ours = grafting.inject_adapter_in_model(
            lora("llama", r=2, target_modules=["q_proj"]), base_model("llama"), low_cpu_mem_usage=True, state_dict=state
        )
    assert any(p.is_meta for p in ours.parameters())
    grafting.set_peft_model_state_dict(ours, state)
    assert not any(p.is_meta for p in ours.parameters())
    assert_close(logits(ours, "llama"), logits(theirs, "llama"), changed_from=logits(base_model("llama"), "llama"))


def test_inject_refuses_prompt_learning_as_peft() -> None:
    config = grafting.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    with pytest.raises(ValueError, match="get_peft_model"):
        grafting.inject_adapter_in_model(config, base_model("llama"))
    theirs = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    with pytest.raises(ValueError, match="prompt learning"):
        peft.inject_adapter_in_model(theirs, base_model("llama"))


# -- AutoPeftModel ---------------------------------------------------------------------------------------------
def _saved_base_and_adapter(tmp_path: Path, task_type: str | None) -> tuple[Path, Any]:
    base_folder = tmp_path / "base"
    base_model("llama").save_pretrained(base_folder)
    config = lora("llama", task_type=task_type, base_model_name_or_path=str(base_folder))
    model = grafting.get_peft_model(base_model("llama"), config)
    randomize(model)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", model


@pytest.mark.parametrize(
    ("auto", "task_type"), [("AutoPeftModelForCausalLM", "CAUSAL_LM"), ("AutoPeftModel", None)], ids=["causal", "auto"]
)
def test_auto_peft_model_loads_base_then_adapter_as_peft(tmp_path: Path, auto: str, task_type: str | None) -> None:
    folder, model = _saved_base_and_adapter(tmp_path, task_type)
    ours = getattr(grafting, auto).from_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = getattr(peft, auto).from_pretrained(folder)
    assert type(ours).__name__ == type(theirs).__name__
    assert type(ours.get_base_model()) is type(theirs.get_base_model())
    base = logits(base_model("llama"), "llama")
    assert_close(logits(ours, "llama"), logits(theirs, "llama"), changed_from=base)
    assert_close(logits(ours, "llama"), logits(model, "llama"), changed_from=base)
    assert not any(p.requires_grad for p in ours.parameters())
    trainable = getattr(grafting, auto).from_pretrained(folder, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_auto_peft_model_of_the_wrong_task_is_refused_as_peft(tmp_path: Path) -> None:
    folder, _ = _saved_base_and_adapter(tmp_path, "CAUSAL_LM")
    with pytest.raises(ValueError, match="AutoPeftModelForCausalLM"):
        grafting.AutoPeftModelForSequenceClassification.from_pretrained(folder)
    with pytest.raises(ValueError, match="AutoPeftModelForCausalLM"):
        grafting.AutoPeftModel.from_pretrained(folder)
    with pytest.raises(ValueError, match="PeftModelForCausalLM"):
        peft.AutoPeftModelForSequenceClassification.from_pretrained(folder)
    with pytest.raises(OSError, match="from_pretrained"):
        grafting.AutoPeftModelForCausalLM()


def test_auto_mapping_outside_the_allowlist_is_refused(tmp_path: Path) -> None:
    folder, _ = _saved_base_and_adapter(tmp_path, None)
    data = json.loads((folder / "adapter_config.json").read_text())
    assert data["auto_mapping"] == {
        "base_model_class": "LlamaForCausalLM",
        "parent_library": "transformers.models.llama.modeling_llama",
    }
    data["auto_mapping"]["parent_library"] = "os"
    (folder / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="allowlist"):
        grafting.AutoPeftModel.from_pretrained(folder)


# -- warnings PEFT gives (grafting's category subclasses PEFT's) ---------------------------------------------------
def _warned(fn: Any) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [w for w in caught if not issubclass(w.category, (FutureWarning, DeprecationWarning))]


def _one_like(
    ours: list[warnings.WarningMessage], theirs: list[warnings.WarningMessage], needle: str, match: str
) -> None:
    peft_warning = next(w for w in theirs if needle in str(w.message))  # PEFT warns once per layer at times
    our_warning = next(w for w in ours if match in str(w.message))
    expected = peft_warning.category
    if expected is peft.PeftWarning:  # PEFT's own class; GraftingWarning plays its role, on the same base
        expected = UserWarning
    assert issubclass(our_warning.category, expected)
    assert issubclass(our_warning.category, grafting.GraftingWarning)


def test_merging_a_merged_adapter_warns_as_peft() -> None:
    models = {}
    for lib in (grafting, peft):
        model = lib.get_peft_model(
            base_model("llama"), lib.LoraConfig(target_modules=["q_proj"], init_lora_weights=False)
        )
        model.merge_adapter()
        models[lib.__name__] = model
    before = logits(models["grafting"], "llama")
    ours = _warned(lambda: models["grafting"].merge_adapter())
    theirs = _warned(lambda: models["peft"].merge_adapter())
    _one_like(ours, theirs, "already merged", "already merged")
    assert_close(logits(models["grafting"], "llama"), before)  # merged once, not twice


def test_unmatched_rank_pattern_keys_warn_as_peft() -> None:
    kwargs = {"target_modules": ["q_proj"], "rank_pattern": {"k_proj": 4}, "alpha_pattern": {"q_proj": 3}}
    ours = _warned(lambda: grafting.get_peft_model(base_model("llama"), grafting.LoraConfig(**kwargs)))
    theirs = _warned(lambda: peft.get_peft_model(base_model("llama"), peft.LoraConfig(**kwargs)))
    _one_like(ours, theirs, "rank_pattern", "rank_pattern")
    assert issubclass(next(w for w in ours if "rank_pattern" in str(w.message)).category, RuntimeWarning)
    assert not [w for w in ours if "alpha_pattern" in str(w.message)]  # q_proj matched


def test_lora_bias_on_a_layer_without_bias_warns_as_peft() -> None:
    kwargs = {"target_modules": ["q_proj"], "lora_bias": True}
    ours = _warned(lambda: grafting.get_peft_model(base_model("llama"), grafting.LoraConfig(**kwargs)))
    theirs = _warned(lambda: peft.get_peft_model(base_model("llama"), peft.LoraConfig(**kwargs)))
    _one_like(ours, theirs, "lora_bias", "lora_bias")


def test_a_renamed_base_model_name_warns_as_peft(tmp_path: Path) -> None:
    base_model("llama").save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    def wrap(lib: Any) -> Any:
        config = lib.LoraConfig(target_modules=["q_proj"], base_model_name_or_path="elsewhere/model")
        lib.get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path), config)
        return config

    ours = _warned(lambda: wrap(grafting))
    theirs = _warned(lambda: wrap(peft))
    _one_like(ours, theirs, "renamed", "base_model_name_or_path")
    assert wrap(grafting).base_model_name_or_path == wrap(peft).base_model_name_or_path == str(tmp_path)


# -- dataclass idioms on configs ------------------------------------------------------------------------------------
def test_dataclasses_idioms_work_on_configs_as_on_peft_s() -> None:
    import dataclasses

    ours = grafting.LoraConfig(r=4, target_modules=["q_proj"], lora_alpha=8)
    theirs = peft.LoraConfig(r=4, target_modules=["q_proj"], lora_alpha=8)
    assert dataclasses.is_dataclass(ours)
    assert dataclasses.is_dataclass(theirs)
    changed, changed_theirs = dataclasses.replace(ours, r=16), dataclasses.replace(theirs, r=16)
    assert type(changed) is grafting.LoraConfig
    assert (changed.r, changed.lora_alpha, ours.r) == (changed_theirs.r, changed_theirs.lora_alpha, theirs.r)
    assert changed.to_dict() == {**ours.to_dict(), "r": 16}
    with pytest.raises(ValueError, match="r must be"):
        dataclasses.replace(ours, r=0)  # the new config is validated
    names = {f.name for f in dataclasses.fields(ours)} - {"extra", *type(ours).absent_in_peft}  # grafting-only options
    assert names <= {f.name for f in dataclasses.fields(theirs)}
    as_dict = dataclasses.asdict(ours)
    assert as_dict["peft_type"] == dataclasses.asdict(theirs)["peft_type"]
    assert {k: as_dict[k] for k in ("r", "lora_alpha", "target_modules")} == {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj"],
    }
    prompt = dataclasses.replace(
        grafting.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), num_virtual_tokens=5
    )
    assert prompt.num_virtual_tokens == 5


# -- base model state dict --------------------------------------------------------------------------------------------
def test_base_model_state_dict_round_trip_as_peft() -> None:
    kwargs = {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"], "init_lora_weights": False}
    ours = grafting.get_peft_model(base_model("llama"), grafting.LoraConfig(**kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base_model("llama"), peft.LoraConfig(**kwargs))
    state = grafting.get_base_model_state_dict(ours)
    expected = peft.get_base_model_state_dict(theirs)
    plain = base_model("llama").state_dict()
    assert sorted(state) == sorted(expected) == sorted(plain)
    for key, value in state.items():
        assert torch.equal(value, plain[key]), key
    other = tiny_llama(seed=3)  # another base: same shapes, other weights
    result = grafting.set_base_model_state_dict(ours, other.state_dict())
    assert result == ([], [])
    with ours.disable_adapter():
        assert_close(logits(ours, "llama"), logits(other, "llama"), changed_from=logits(base_model("llama"), "llama"))
    with pytest.raises(AssertionError):  # the adapters are still there
        assert_close(logits(ours, "llama"), logits(other, "llama"))
    partial = {k: v for k, v in other.state_dict().items() if "norm" not in k}
    for model, fn in ((ours, grafting.set_base_model_state_dict), (theirs, peft.set_base_model_state_dict)):
        with pytest.raises(RuntimeError, match="norm"):
            fn(model, partial)
    assert grafting.set_base_model_state_dict(ours, partial, strict=False).missing_keys == sorted(
        set(plain) - set(partial), key=list(plain).index
    )


# -- loading base biases with bias="none", as PEFT does ------------------------------------------------------------
def test_base_bias_keys_load_with_bias_none_as_peft(tmp_path: Path) -> None:
    model = grafting.get_peft_model(base_model("bert"), lora("bert", bias="all"))
    randomize(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and p.requires_grad:
                p.add_(0.5)
    model.save_pretrained(tmp_path)
    config = grafting.PeftConfig.from_pretrained(tmp_path)
    config.bias = "none"
    ours = grafting.PeftModel.from_pretrained(base_model("bert"), tmp_path, config=config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_config = peft.PeftConfig.from_pretrained(tmp_path)
        theirs_config.bias = "none"
        theirs = peft.PeftModel.from_pretrained(base_model("bert"), tmp_path, config=theirs_config)
    base = logits(base_model("bert"), "bert")
    assert_close(logits(ours, "bert"), logits(theirs, "bert"), changed_from=base)
    assert_close(logits(ours, "bert"), logits(model, "bert"), changed_from=base)


# -- per-sample routing over a modules_to_save module with a tuple output ----------------------------------------
def test_per_sample_routing_over_a_gru_copy_is_a_clear_error() -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.gru = torch.nn.GRU(4, 4, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.gru(self.lin(x))[0]

    torch.manual_seed(0)
    model = grafting.get_peft_model(
        Net(), grafting.LoraConfig(target_modules=["lin"], modules_to_save=["gru"]), mixed=True
    )
    model.add_adapter("b", grafting.LoraConfig(target_modules=["lin"], modules_to_save=["gru"]))
    x = torch.randn(2, 3, 4)
    assert model(x).shape == (2, 3, 4)
    with pytest.raises(grafting.UnsupportedLayerError, match="GRU"):
        model(x, adapter_names=["default", "b"])
    with pytest.raises(TypeError, match="tuple"):
        model(x, adapter_names=["default", "b"])


def test_load_peft_weights_as_peft(tmp_path: Path) -> None:
    model = grafting.get_peft_model(base_model("llama"), lora("llama"))
    randomize(model)
    model.save_pretrained(tmp_path)
    mapping = {r"\.q_proj\.": ".query_projection."}
    for key_mapping in (None, mapping):
        ours = grafting.load_peft_weights(tmp_path, key_mapping=key_mapping)
        theirs = peft.load_peft_weights(str(tmp_path), device="cpu", key_mapping=key_mapping)
        assert sorted(ours) == sorted(theirs)
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert any(".query_projection." in k for k in grafting.load_peft_weights(tmp_path, key_mapping=mapping))


def test_auto_peft_model_grows_embeddings_to_the_adapter_s_tokenizer_as_peft(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    folder, _ = _saved_base_and_adapter(tmp_path, "CAUSAL_LM")
    vocab = {f"t{i}": i for i in range(70)}  # more tokens than the model's 64 embeddings
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    tokenizer.save_pretrained(folder)
    ours = grafting.AutoPeftModelForCausalLM.from_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.AutoPeftModelForCausalLM.from_pretrained(folder)
    assert ours.get_input_embeddings().weight.shape == theirs.get_input_embeddings().weight.shape == (70, 16)
