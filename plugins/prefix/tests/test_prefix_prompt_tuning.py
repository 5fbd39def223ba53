"""Prompt tuning: PEFT interop both ways (forward, loss, greedy generate), invariants, initializations."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from prefix_helpers import adapter_parameters, assert_prompted, configs, greedy_reference, snapshot, train_steps
from safetensors.torch import load_file

from grafting import AdapterStateError, PeftModel, get_peft_model
from grafting.testing import assert_close, assert_identical, model_output, sample_inputs, tiny_model
from grafting_prefix import PromptTuningConfig

CASES = [("llama", "CAUSAL_LM"), ("gpt2", "CAUSAL_LM"), ("bert", "SEQ_CLS")]
N = 3


def labels_for(arch: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    if arch == "bert":
        return torch.tensor([0, 2])
    return inputs["input_ids"]


@torch.no_grad()
def perturb_heads(model: torch.nn.Module, seed: int) -> None:
    """Move the trained head copies (modules_to_save) away from the base head, so loading them shows."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "modules_to_save" in name:
            p.add_(torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize(("arch", "task"), CASES)
def test_peft_saves_grafting_loads(arch: str, task: str, tmp_path) -> None:
    inputs = sample_inputs(arch, seed=1)
    _, config = configs("prompt", task, N)
    theirs = peft.get_peft_model(tiny_model(arch, seed=1), config)
    perturb_heads(theirs, 1)
    theirs.eval()
    expected = model_output(theirs, inputs)
    base = model_output(tiny_model(arch, seed=1), inputs)
    theirs.save_pretrained(tmp_path)

    ours = PeftModel.from_pretrained(tiny_model(arch, seed=1), tmp_path)
    assert_prompted(model_output(ours, inputs), expected, base, "PEFT's prompts in grafting")
    labels = labels_for(arch, inputs)
    with torch.no_grad():
        assert_close(ours(**inputs, labels=labels).loss, theirs(**inputs, labels=labels).loss, msg="loss")
    if task == "CAUSAL_LM":
        with torch.no_grad():
            ids = ours.generate(**inputs, max_new_tokens=5, do_sample=False)
        assert torch.equal(ids, greedy_reference(theirs, inputs["input_ids"], 5))


@pytest.mark.parametrize(("arch", "task"), CASES)
def test_grafting_saves_peft_loads(arch: str, task: str, tmp_path) -> None:
    inputs = sample_inputs(arch, seed=2)
    config, _ = configs("prompt", task, N)
    ours = get_peft_model(tiny_model(arch, seed=2), config)
    perturb_heads(ours, 2)
    ours.eval()
    expected = model_output(ours, inputs)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["token_dim"], saved["num_layers"], saved["num_transformer_submodules"]) == (16, 2, 1)
    assert "target_modules" not in saved
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["prompt_embeddings"].shape == (N, 16)

    theirs = peft.PeftModel.from_pretrained(tiny_model(arch, seed=2), tmp_path).eval()
    base = model_output(tiny_model(arch, seed=2), inputs)
    assert_prompted(model_output(theirs, inputs), expected, base, "grafting's prompts in PEFT")
    if task == "CAUSAL_LM":
        with torch.no_grad():
            ids = ours.generate(**inputs, max_new_tokens=5, do_sample=False)
        assert torch.equal(ids, greedy_reference(theirs, inputs["input_ids"], 5))


@pytest.mark.parametrize(("arch", "task"), CASES)
def test_disabled_is_the_base_model(arch: str, task: str) -> None:
    inputs = sample_inputs(arch, seed=3)
    base = tiny_model(arch, seed=3)
    ours = get_peft_model(tiny_model(arch, seed=3), configs("prompt", task, N)[0])
    perturb_heads(ours, 3)
    ours.eval()
    prompted = model_output(ours, inputs)
    with ours.disable_adapter():
        disabled = model_output(ours, inputs)
        assert_prompted(model_output(base, inputs), disabled, prompted, "disabled")
        if task == "CAUSAL_LM":
            with torch.no_grad():
                got = ours.generate(**inputs, max_new_tokens=4, do_sample=False)
                want = base.generate(**inputs, max_new_tokens=4, do_sample=False)
            assert torch.equal(got, want)
    assert model_output(ours, inputs).shape[1] == (inputs["input_ids"].shape[1] + N if task == "CAUSAL_LM" else 3)


@pytest.mark.parametrize(("arch", "task"), CASES)
def test_training_changes_only_the_prompts_and_save_load_is_exact(arch: str, task: str, tmp_path) -> None:
    inputs = sample_inputs(arch, seed=4)
    ours = get_peft_model(tiny_model(arch, seed=4), configs("prompt", task, N)[0])
    before = snapshot(ours)
    train_steps(ours, inputs, labels_for(arch, inputs))
    after = snapshot(ours)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    adapter = set(adapter_parameters(ours))
    heads = {n for n in before if "modules_to_save" in n}
    assert adapter <= changed
    assert changed <= adapter | heads
    assert (changed & heads) == heads  # the classification head trains in full (PEFT's modules_to_save)

    expected = model_output(ours, inputs)
    ours.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(arch, seed=4), tmp_path)
    base = model_output(tiny_model(arch, seed=4), inputs)
    assert_prompted(model_output(loaded, inputs), expected, base, "reloaded")
    if task == "CAUSAL_LM":
        with torch.no_grad():
            assert torch.equal(
                loaded.generate(**inputs, max_new_tokens=4, do_sample=False),
                ours.generate(**inputs, max_new_tokens=4, do_sample=False),
            )


def test_inputs_embeds_and_position_ids() -> None:
    inputs = sample_inputs("llama", seed=5)
    ours = get_peft_model(tiny_model("llama", seed=5), configs("prompt", "CAUSAL_LM", N)[0]).eval()
    expected = model_output(ours, inputs)
    embeds = ours.get_base_model().get_input_embeddings()(inputs["input_ids"])
    got = model_output(ours, {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]})
    base = model_output(tiny_model("llama", seed=5), inputs)
    assert_prompted(got, expected, base, "from inputs_embeds")
    positions = torch.arange(inputs["input_ids"].shape[1]).expand(2, -1) + 7
    with pytest.warns(UserWarning, match="position_ids"):
        ignored = model_output(ours, {**inputs, "position_ids": positions})
    assert_close(ignored, expected, msg="position_ids ignored, as PEFT does")


def test_generate_lengths_count_from_the_input_ids() -> None:
    inputs = sample_inputs("gpt2", seed=6)
    length = inputs["input_ids"].shape[1]
    ours = get_peft_model(tiny_model("gpt2", seed=6), configs("prompt", "CAUSAL_LM", N)[0]).eval()
    with torch.no_grad():
        by_total = ours.generate(**inputs, max_length=length + 4, do_sample=False)
        by_new = ours.generate(**inputs, max_new_tokens=4, do_sample=False)
        at_least = ours.generate(**inputs, min_length=length + 3, max_new_tokens=3, do_sample=False)
    assert by_total.shape == (2, length + 4)
    assert torch.equal(by_total, by_new)
    assert at_least.shape == (2, length + 3)


def test_routing_samples_is_refused_with_a_model_level_adapter() -> None:
    inputs = sample_inputs("llama")
    ours = get_peft_model(tiny_model("llama"), configs("prompt", "CAUSAL_LM", N)[0])
    with pytest.raises(AdapterStateError, match="model-level"):
        ours(**inputs, adapter_names=["default", "__base__"])


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> str:
    """A word-level tokenizer over the tiny models' 64-token vocabulary, saved to a folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(64)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0").save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("n", [2, 7])
def test_text_init_matches_peft(tokenizer_path: str, n: int, tmp_path) -> None:
    options = {
        "prompt_tuning_init": "TEXT",
        "prompt_tuning_init_text": "w5 w9 w11",
        "tokenizer_name_or_path": tokenizer_path,
    }
    ours_config, theirs_config = configs("prompt", "CAUSAL_LM", n, **options)
    ours = get_peft_model(tiny_model("llama", seed=7), ours_config)
    theirs = peft.get_peft_model(tiny_model("llama", seed=7), theirs_config)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")["prompt_embeddings"]
    reference = load_file(tmp_path / "theirs" / "adapter_model.safetensors")["prompt_embeddings"]
    assert_identical(mine, reference, msg="PEFT's text init")
    ids = torch.tensor(([5, 9, 11] * 3)[:n])
    assert_identical(mine, ours.get_base_model().get_input_embeddings().weight[ids].detach(), msg="embedding rows")
    for key in ("prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"):
        assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())[key] == theirs_config.to_dict()[key]


def test_text_init_with_a_missing_tokenizer_is_a_config_error(tmp_path) -> None:
    from grafting import ConfigError

    config = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=2,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="w1",
        tokenizer_name_or_path=str(tmp_path / "no-such-tokenizer"),
    )
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="tokenizer"):
        get_peft_model(model, config)
    assert all(p.requires_grad for p in model.parameters())  # left as it was


def test_sample_vocab_init_takes_vocabulary_rows() -> None:
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init="SAMPLE_VOCAB")
    ours = get_peft_model(tiny_model("gpt2"), config)
    table = ours.base_model.model_adapters["default"].tokens().detach()
    vocabulary = ours.get_base_model().get_input_embeddings().weight
    for row in table:
        assert (vocabulary == row).all(dim=1).any()


def test_a_second_prompt_adapter_saves_to_its_subfolder_for_peft(tmp_path) -> None:
    inputs = sample_inputs("llama", seed=8)
    ours = get_peft_model(tiny_model("llama", seed=8), configs("prompt", "CAUSAL_LM", N)[0]).eval()
    ours.add_adapter("other", configs("prompt", "CAUSAL_LM", N + 2)[0])
    first = model_output(ours, inputs)
    ours.set_adapter("other")
    second = model_output(ours, inputs)
    assert second.shape[1] == first.shape[1] + 2
    ours.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(tiny_model("llama", seed=8), tmp_path).eval()
    base = model_output(tiny_model("llama", seed=8), inputs)
    assert_prompted(model_output(theirs, inputs), first, base, "first adapter in PEFT")
    theirs.load_adapter(tmp_path / "other", adapter_name="other")
    theirs.set_adapter("other")
    assert_prompted(model_output(theirs, inputs), second, first, "second adapter in PEFT")


def test_prompts_compose_with_lora_in_a_mixed_model(tmp_path) -> None:
    """LoRA acts in the layers while the prompt rewrites the input: the mix is LoRA fed the prompted embeddings."""
    from grafting import LoraConfig

    inputs = sample_inputs("llama", seed=9)
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    mixed = get_peft_model(tiny_model("llama", seed=9), lora, mixed=True).eval()
    mixed.add_adapter("prompt", configs("prompt", "CAUSAL_LM", N)[0])
    mixed.set_adapter(["default", "prompt"])
    got = model_output(mixed, inputs)

    prompts = mixed.base_model.model_adapters["prompt"].tokens().detach()
    embeds = mixed.get_base_model().get_input_embeddings()(inputs["input_ids"])
    prompted = {"inputs_embeds": torch.cat([prompts.expand(2, -1, -1), embeds], dim=1)}
    mixed.set_adapter("default")
    lora_only = model_output(mixed, inputs)
    assert_prompted(got, model_output(mixed, prompted), lora_only, "LoRA on the prompted embeddings")

    mixed.set_adapter(["default", "prompt"])
    mixed.save_pretrained(tmp_path)
    back = PeftModel.from_pretrained(tiny_model("llama", seed=9), tmp_path, mixed=True)
    assert_prompted(model_output(back, inputs), got, lora_only, "reloaded mix")
