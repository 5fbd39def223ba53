"""Configs of the virtual-token methods: validation, PEFT's adapter_config.json both ways, model checks."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from prefix_helpers import configs

import grafting
from grafting import ConfigError, GraftingWarning, UnsupportedLayerError, get_peft_model
from grafting.config.adapter_config import AdapterConfig
from grafting.testing import assert_identical, tiny_model
from grafting_prefix import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

METHODS = ("prompt", "p_mlp", "p_lstm", "prefix", "prefix_proj")


def test_grafting_resolves_the_config_classes() -> None:
    assert grafting.PromptTuningConfig is PromptTuningConfig
    assert grafting.PromptEncoderConfig is PromptEncoderConfig
    assert grafting.PrefixTuningConfig is PrefixTuningConfig


def test_prompt_tuning_init_is_exported_and_is_a_str_enum_like_peft_s() -> None:
    import grafting_prefix

    init = grafting.PromptTuningInit
    assert init is grafting_prefix.PromptTuningInit
    assert [m.value for m in init] == [m.value for m in peft.PromptTuningInit]
    config = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=2,
        prompt_tuning_init=init.TEXT,
        prompt_tuning_init_text="hello",
        tokenizer_name_or_path="some/tokenizer",
    )
    assert config.to_dict()["prompt_tuning_init"] == "TEXT" == init.TEXT


@pytest.mark.parametrize("n", [0, -2, 2.5, True, "3"])
@pytest.mark.parametrize("klass", [PromptTuningConfig, PromptEncoderConfig, PrefixTuningConfig])
def test_num_virtual_tokens_must_be_a_positive_integer(klass: type, n: object) -> None:
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        klass(task_type="CAUSAL_LM", num_virtual_tokens=n)


@pytest.mark.parametrize(
    ("klass", "options", "field"),
    [
        (PromptTuningConfig, {"prompt_tuning_init": "WORDS"}, "prompt_tuning_init"),
        (PromptTuningConfig, {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hi"}, "tokenizer"),
        (PromptTuningConfig, {"prompt_tuning_init": "TEXT", "tokenizer_name_or_path": "t"}, "init_text"),
        (PromptTuningConfig, {"tokenizer_kwargs": {"use_fast": True}}, "tokenizer_kwargs"),
        (PromptTuningConfig, {"target_modules": ["q_proj"]}, "target_modules"),
        (PromptTuningConfig, {"token_dim": 0}, "token_dim"),
        (PromptEncoderConfig, {"encoder_reparameterization_type": "GRU"}, "encoder_reparameterization_type"),
        (PromptEncoderConfig, {"encoder_dropout": 1.5}, "encoder_dropout"),
        (PromptEncoderConfig, {"encoder_hidden_size": -1}, "encoder_hidden_size"),
        (PrefixTuningConfig, {"init_weights": "ones"}, "init_weights"),
        (PrefixTuningConfig, {"prefix_projection": "yes"}, "prefix_projection"),
        (PrefixTuningConfig, {"layers_to_transform": [0]}, "layers_to_transform"),
    ],
)
def test_invalid_options_are_config_errors(klass: type, options: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        klass(task_type="CAUSAL_LM", num_virtual_tokens=2, **options)


def test_an_mlp_with_other_depth_warns_as_peft_does() -> None:
    with pytest.warns(GraftingWarning, match="encoder_num_layers"):
        PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, encoder_num_layers=3)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_config_files_round_trip(method: str, arch: str, tmp_path) -> None:
    """PEFT's saved adapter_config.json reads into grafting and is written back with the same content."""
    _, theirs = configs(method)
    peft.get_peft_model(tiny_model(arch), theirs).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unknown keys
        ours = AdapterConfig.from_pretrained(tmp_path)
    assert type(ours) is configs(method)[0].__class__
    assert ours.to_dict() == written


@pytest.mark.parametrize("method", METHODS)
def test_grafting_configs_read_in_peft_with_the_model_values(method: str, tmp_path) -> None:
    """The config grafting saves is PEFT's, with the values PEFT derives from the model."""
    ours, theirs = configs(method)
    get_peft_model(tiny_model("llama"), ours).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(tiny_model("llama"), theirs).save_pretrained(tmp_path / "theirs")
    mine = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    reference = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    reference.pop("auto_mapping")
    assert mine.pop("peft_version").startswith(reference.pop("peft_version") + "+grafting.")
    assert mine == reference
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT warns about keys it does not know
        loaded = peft.PeftConfig.from_pretrained(tmp_path / "ours")
    assert loaded.to_dict()["num_layers"] == 2


def test_the_users_config_is_not_changed_by_the_model() -> None:
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    model = get_peft_model(tiny_model("llama"), config)
    assert config.token_dim is None
    kept = model.peft_config["default"]
    assert (kept.token_dim, kept.num_attention_heads, kept.encoder_hidden_size) == (8, 1, 8)  # grouped-query attention


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("arch", "config", "error", "match"),
    [
        ("llama", PromptTuningConfig(num_virtual_tokens=2), ConfigError, "task_type=None"),
        ("llama", PromptTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=2), ConfigError, "TOKEN_CLS"),
        (
            "llama",
            PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2),
            UnsupportedLayerError,
            "not an encoder-decoder",
        ),
        (
            "t5",
            PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2, num_transformer_submodules=3),
            ConfigError,
            "num_transformer_submodules",
        ),
        (
            "t5",
            PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
            UnsupportedLayerError,
            "encoder-decoder",
        ),
        (
            "llama",
            PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, token_dim=12),
            ConfigError,
            "token_dim",
        ),
        (
            "gpt2",
            PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, num_transformer_submodules=2),
            ConfigError,
            "num_transformer_submodules",
        ),
        (
            "gpt2",
            PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, num_layers=5),
            ConfigError,
            "num_layers",
        ),
        (
            "gpt2",
            PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, token_dim=12, num_attention_heads=2),
            ConfigError,
            "token_dim",
        ),
    ],
)
def test_unsupported_tasks_and_models_leave_the_model_unchanged(arch, config, error, match) -> None:
    model = tiny_model(arch)
    before = base_state(model)
    with pytest.raises(error, match=match):
        get_peft_model(model, config)
    assert all(p.requires_grad for p in model.parameters())
    assert_identical({n: p.detach() for n, p in model.named_parameters()}, before, msg="after the refusal")


def test_prefix_tuning_refuses_gradient_checkpointing() -> None:
    model = tiny_model("llama")
    model.gradient_checkpointing_enable()
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))


def test_a_model_without_input_embeddings_is_unsupported() -> None:
    class Plain(torch.nn.Module):
        config = tiny_model("gpt2").config

        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(16, 16)

    with pytest.raises(UnsupportedLayerError, match="input embedding"):
        get_peft_model(Plain(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
