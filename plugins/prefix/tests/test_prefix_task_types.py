"""Prefix tuning beyond causal LMs (T5/BART seq2seq, classification, feature extraction), against PEFT."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from prefix_helpers import configs
from safetensors.torch import load_file
from torch import nn

from grafting import ConfigError, PeftModel, get_peft_model
from grafting.testing import assert_close, sample_inputs, tiny_model

N = 3


def _bart(seed: int) -> nn.Module:
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=64,
        d_model=16,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
    )
    return BartForConditionalGeneration(config).eval()


def _headed(kind: str, seed: int) -> nn.Module:
    """A tiny llama or GPT-2 with a task head (or none: the bare model for feature extraction)."""
    import transformers

    arch, task = kind.split("-")
    config = tiny_model(arch).config
    config.pad_token_id = 0
    config.num_labels = 3
    prefix = {"llama": "Llama", "gpt2": "GPT2"}[arch]
    name = {
        "SEQ_CLS": "ForSequenceClassification",
        "TOKEN_CLS": "ForTokenClassification",
        "QUESTION_ANS": "ForQuestionAnswering",
        "FEATURE_EXTRACTION": "Model",
    }[task]
    torch.manual_seed(seed)
    return getattr(transformers, prefix + name)(config).eval()


def _output(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    for name in ("logits", "start_logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    raise AssertionError(f"no output tensor in {type(out).__name__}")


def _peft_load(base: nn.Module, folder: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, str(folder)).eval()


def _randomize(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda item: item[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)


SEQ2SEQ = {"t5": lambda seed: tiny_model("t5", seed=seed), "bart": _bart}


def _seq2seq_inputs(seed: int) -> dict[str, torch.Tensor]:
    inputs = sample_inputs("t5", seed=seed)
    inputs["decoder_input_ids"][:, 0] = 2  # BART's start token; any id does for T5
    return inputs


@pytest.mark.parametrize("arch", sorted(SEQ2SEQ))
@pytest.mark.parametrize("method", ["prefix", "prefix_proj"])
def test_peft_seq2seq_prefix_loads_with_the_same_logits(arch: str, method: str, tmp_path: Path) -> None:
    build = SEQ2SEQ[arch]
    inputs = _seq2seq_inputs(41)
    torch.manual_seed(41)
    theirs = peft.get_peft_model(build(41), configs(method, "SEQ_2_SEQ_LM", N)[1]).eval()
    _randomize(theirs, 1)
    expected = _output(theirs, inputs)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(build(41), tmp_path)
    assert type(ours).__name__ == "PeftModelForSeq2SeqLM"
    assert_close(_output(ours, inputs), expected, changed_from=_output(build(41), inputs))
    masked = {**inputs, "decoder_attention_mask": torch.ones_like(inputs["decoder_input_ids"])}
    masked["decoder_attention_mask"][0, -1] = 0
    assert_close(_output(ours, masked), _output(theirs, masked))
    labels = inputs["decoder_input_ids"]
    encoder = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with torch.no_grad():
        assert_close(ours(**encoder, labels=labels).loss, theirs(**encoder, labels=labels).loss)


@pytest.mark.parametrize("arch", sorted(SEQ2SEQ))
def test_grafting_seq2seq_prefix_loads_in_peft_and_generates_greedily(arch: str, tmp_path: Path) -> None:
    build = SEQ2SEQ[arch]
    inputs = _seq2seq_inputs(42)
    ours = get_peft_model(build(42), configs("prefix", "SEQ_2_SEQ_LM", N)[0]).eval()
    _randomize(ours, 2)
    expected = _output(ours, inputs)
    ours.save_pretrained(tmp_path)
    base = _output(build(42), inputs)
    assert_close(_output(_peft_load(build(42), tmp_path), inputs), expected, changed_from=base)
    with ours.disable_adapter():
        assert_close(_output(ours, inputs), base)
    # generate (with its cache) equals greedy decoding by full forward passes
    encoder = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    start = build(42).config.decoder_start_token_id
    decoded = torch.full((inputs["input_ids"].shape[0], 1), start, dtype=torch.long)
    for _ in range(4):
        step = _output(ours, {**encoder, "decoder_input_ids": decoded})
        decoded = torch.cat([decoded, step[:, -1:].argmax(-1)], dim=1)
    with torch.no_grad():
        generated = ours.generate(**encoder, max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert torch.equal(generated[:, : decoded.shape[1]], decoded)


HEADED = ["llama-SEQ_CLS", "gpt2-SEQ_CLS", "llama-TOKEN_CLS", "llama-QUESTION_ANS", "llama-FEATURE_EXTRACTION"]


def _head_output(headed: Any, task: str, hidden: torch.Tensor) -> torch.Tensor:
    """What the task head of ``headed`` (grafting-wrapped) computes from the backbone's hidden states."""
    model = headed.get_base_model()
    with torch.no_grad():
        if task == "QUESTION_ANS":
            return model.qa_outputs(hidden).split(1, dim=-1)[0].squeeze(-1)
        logits = model.score(hidden)
    return logits[:, -1] if task == "SEQ_CLS" else logits  # no pad token in the inputs: the last one pools


@pytest.mark.parametrize("kind", HEADED)
def test_prefix_on_models_that_take_a_cache_matches_peft(kind: str, tmp_path: Path) -> None:
    """PEFT 0.21 passes the prefix to classification models under a name transformers 5 no longer takes, so
    the oracle is PEFT's prefix on the backbone (feature extraction), followed by the model's own head."""
    task = kind.split("-")[1]
    inputs = sample_inputs("llama", seed=43)
    inputs["attention_mask"][0, :2] = 0  # left padding in one row
    ours = get_peft_model(_headed(kind, 43), configs("prefix", task, N)[0]).eval()
    _randomize(ours, 3)
    out = _output(ours, inputs)
    ours.save_pretrained(tmp_path)
    backbone = copy.deepcopy(ours.get_base_model().base_model)
    if task == "FEATURE_EXTRACTION":
        backbone = _headed(kind, 43)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(backbone, configs("prefix", "FEATURE_EXTRACTION", N)[1]).eval()
        peft.set_peft_model_state_dict(theirs, load_file(tmp_path / "adapter_model.safetensors"))
    hidden = _output(theirs, inputs)
    expected = hidden if task == "FEATURE_EXTRACTION" else _head_output(ours, task, hidden)
    assert_close(out, expected, changed_from=_output(_headed(kind, 43), inputs))
    # and back: the saved adapter loads with the same outputs
    assert_close(_output(PeftModel.from_pretrained(_headed(kind, 43), tmp_path), inputs), out)


def test_prefix_for_sequence_classification_keeps_token_type_ids() -> None:
    model = get_peft_model(_headed("llama-SEQ_CLS", 46), configs("prefix", "SEQ_CLS", N)[0])
    adapter = model.base_model.active_model_adapter()
    inputs = sample_inputs("llama", seed=46)
    types = torch.zeros_like(inputs["input_ids"])
    prepared = adapter.prepare({**inputs, "token_type_ids": types}, model.get_base_model())
    assert prepared["token_type_ids"] is types
    assert prepared["attention_mask"].shape[1] == N + types.shape[1]


@pytest.mark.parametrize("method", ["prompt", "p_mlp"])
def test_prompt_learning_for_feature_extraction_matches_peft(method: str, tmp_path: Path) -> None:
    inputs = sample_inputs("llama", seed=45)
    torch.manual_seed(45)
    theirs = peft.get_peft_model(_headed("llama-FEATURE_EXTRACTION", 45), configs(method, "FEATURE_EXTRACTION", N)[1])
    theirs.eval()
    expected = _output(theirs, inputs)
    assert expected.shape[1] == N + inputs["input_ids"].shape[1]  # the virtual positions come out too, as in PEFT
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(_headed("llama-FEATURE_EXTRACTION", 45), tmp_path)
    assert type(ours).__name__ == "PeftModelForFeatureExtraction"
    base = _output(_headed("llama-FEATURE_EXTRACTION", 45), inputs)
    assert_close(_output(ours, inputs)[:, N:], expected[:, N:], changed_from=base)
    assert_close(_output(ours, inputs), expected)


def test_seq2seq_prefix_refuses_what_peft_gets_wrong_or_cannot_fit() -> None:
    one = configs("prefix", "SEQ_2_SEQ_LM", N, num_transformer_submodules=1)[0]
    with pytest.raises(ConfigError, match="num_transformer_submodules"):
        get_peft_model(tiny_model("t5"), one)
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=3, num_heads=2)
    with pytest.raises(ConfigError, match="decoder has 3 layers"):
        get_peft_model(T5ForConditionalGeneration(config), configs("prefix", "SEQ_2_SEQ_LM", N)[0])


@pytest.mark.parametrize("method", ["prompt", "p_mlp", "prefix"])
def test_configs_build_without_num_virtual_tokens_and_refuse_when_added(method: str) -> None:
    ours, theirs = configs(method, "CAUSAL_LM", N)
    lacking = type(ours)(task_type="CAUSAL_LM")  # PEFT builds it too, and checks when the config is used
    assert type(theirs)(task_type="CAUSAL_LM").num_virtual_tokens is None
    assert lacking.num_virtual_tokens is None
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="num_virtual_tokens is not set"):
        get_peft_model(model, lacking)
    assert not any(".model_adapters." in n for n, _ in model.named_parameters())
