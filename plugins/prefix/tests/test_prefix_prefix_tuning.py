"""Prefix tuning (with and without the projection): PEFT interop both ways, the cache, training, reloading."""

from __future__ import annotations

import peft
import pytest
import torch
from prefix_helpers import adapter_parameters, configs, greedy_reference, snapshot, train_steps
from safetensors.torch import load_file

from grafting import PeftModel, get_peft_model
from grafting.testing import assert_close, assert_identical, model_output, sample_inputs, tiny_model
from grafting_prefix.encoders import PromptTable

ARCHS = ("llama", "gpt2")
METHODS = ("prefix", "prefix_proj")
N = 3
#: (layers, 2, key/value heads, head width) of the tiny models: Llama has one key/value head (GQA).
WIDTH = {"llama": 2 * 2 * 1 * 8, "gpt2": 2 * 2 * 2 * 8}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_peft_saves_grafting_loads(method: str, arch: str, tmp_path) -> None:
    inputs = sample_inputs(arch, seed=21)
    torch.manual_seed(21)
    theirs = peft.get_peft_model(tiny_model(arch, seed=21), configs(method, n=N)[1]).eval()
    expected = model_output(theirs, inputs)
    plain = model_output(tiny_model(arch, seed=21), inputs)
    theirs.save_pretrained(tmp_path)

    ours = PeftModel.from_pretrained(tiny_model(arch, seed=21), tmp_path)
    assert_close(model_output(ours, inputs), expected, changed_from=plain, msg="PEFT's prefix in grafting")
    labels = inputs["input_ids"]
    with torch.no_grad():
        assert_close(ours(**inputs, labels=labels).loss, theirs(**inputs, labels=labels).loss, msg="loss")
        ids = ours.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(ids, greedy_reference(theirs, inputs["input_ids"], 5))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_grafting_saves_peft_loads(method: str, arch: str, tmp_path) -> None:
    inputs = sample_inputs(arch, seed=22)
    torch.manual_seed(22)
    ours = get_peft_model(tiny_model(arch, seed=22), configs(method, n=N)[0]).eval()
    expected = model_output(ours, inputs)
    ours.save_pretrained(tmp_path)
    assert load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"].shape == (N, WIDTH[arch])

    theirs = peft.PeftModel.from_pretrained(tiny_model(arch, seed=22), tmp_path).eval()
    plain = model_output(tiny_model(arch, seed=22), inputs)
    assert_close(model_output(theirs, inputs), expected, changed_from=plain, msg="grafting's prefix in PEFT")
    with torch.no_grad():
        ids = ours.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(ids, greedy_reference(theirs, inputs["input_ids"], 5))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_training_changes_only_the_prefix_and_reloading_is_exact(method: str, arch: str, tmp_path) -> None:
    inputs = sample_inputs(arch, seed=23)
    torch.manual_seed(23)
    base = tiny_model(arch, seed=23)
    ours = get_peft_model(tiny_model(arch, seed=23), configs(method, n=N)[0])
    before = snapshot(ours)
    train_steps(ours, inputs, inputs["input_ids"])
    changed = {n for n, p in ours.named_parameters() if not torch.equal(before[n], p)}
    assert changed == set(adapter_parameters(ours))

    expected = model_output(ours, inputs)
    with ours.disable_adapter():
        assert_close(model_output(ours, inputs), model_output(base, inputs), changed_from=expected, msg="disabled")
        with torch.no_grad():
            plain = ours.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert torch.equal(plain, base.generate(**inputs, max_new_tokens=3, do_sample=False))
    with torch.no_grad():
        generated = ours.generate(**inputs, max_new_tokens=4, do_sample=False)
    ours.save_pretrained(tmp_path)
    for trainable in (False, True):
        loaded = PeftModel.from_pretrained(tiny_model(arch, seed=23), tmp_path, is_trainable=trainable)
        assert_close(model_output(loaded, inputs), expected, changed_from=model_output(base, inputs), msg="reloaded")
        with torch.no_grad():
            assert torch.equal(loaded.generate(**inputs, max_new_tokens=4, do_sample=False), generated)
        table = loaded.base_model.model_adapters["default"].encoder
        assert isinstance(table, PromptTable)  # a projected prefix comes back as its output
        assert table.embedding.weight.requires_grad is trainable


def test_position_ids_count_after_the_prefix() -> None:
    inputs = sample_inputs("llama", seed=24)
    ours = get_peft_model(tiny_model("llama", seed=24), configs("prefix", n=N)[0]).eval()
    positions = torch.arange(inputs["input_ids"].shape[1]).expand(2, -1)
    expected = model_output(ours, inputs)
    shifted = model_output(ours, {**inputs, "position_ids": positions + 2})
    assert_close(model_output(ours, {**inputs, "position_ids": positions}), expected, changed_from=shifted)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_returned_cache_continues_the_sequence(arch: str) -> None:
    """forward(first tokens) then forward(last token, its cache) equals one forward over all tokens."""
    inputs = sample_inputs(arch, seed=25, length=7)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    ours = get_peft_model(tiny_model(arch, seed=25), configs("prefix_proj", n=N)[0]).eval()
    with torch.no_grad():
        full = ours(**inputs).logits
        first = ours(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        cache = getattr(first, "cache", None) or first.past_key_values
        assert cache.get_seq_length() == N + ids.shape[1] - 1
        last = ours(input_ids=ids[:, -1:], attention_mask=mask, cache=cache).logits
    assert_close(last[:, -1], full[:, -1], msg="continued from the cache")


def test_zero_init_matches_peft(tmp_path) -> None:
    for method in METHODS:
        ours, theirs = configs(method, n=N, init_weights="zero")
        get_peft_model(tiny_model("gpt2"), ours).save_pretrained(tmp_path / method / "ours")
        peft.get_peft_model(tiny_model("gpt2"), theirs).save_pretrained(tmp_path / method / "theirs")
        mine = load_file(tmp_path / method / "ours" / "adapter_model.safetensors")["prompt_embeddings"]
        reference = load_file(tmp_path / method / "theirs" / "adapter_model.safetensors")["prompt_embeddings"]
        assert_identical(mine, torch.zeros(N, WIDTH["gpt2"]), msg="zero init")
        assert_identical(mine, reference, msg="PEFT's zero init")


def test_an_empty_cache_given_to_the_call_gets_the_prefix() -> None:
    from transformers import DynamicCache

    inputs = sample_inputs("gpt2", seed=26)
    ours = get_peft_model(tiny_model("gpt2", seed=26), configs("prefix", n=N)[0]).eval()
    expected = model_output(ours, inputs)
    cache = DynamicCache()
    plain = model_output(tiny_model("gpt2", seed=26), inputs)
    assert_close(model_output(ours, {**inputs, "cache": cache}), expected, changed_from=plain, msg="given cache")
    assert cache.get_seq_length() == N + inputs["input_ids"].shape[1]


def test_a_model_whose_forward_takes_no_cache_is_unsupported() -> None:
    from grafting import UnsupportedLayerError

    class NoCache(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny_model("gpt2")
            self.config = self.inner.config

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=input_ids).logits

    with pytest.raises(UnsupportedLayerError, match="no key/value cache"):
        get_peft_model(NoCache(), configs("prefix", n=N)[0])
