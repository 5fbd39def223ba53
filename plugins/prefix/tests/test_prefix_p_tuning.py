"""P-tuning (MLP and LSTM encoders): PEFT interop both ways, the saved encoder output, training, reloading."""

from __future__ import annotations

import peft
import pytest
import torch
from prefix_helpers import adapter_parameters, assert_prompted, configs, greedy_reference, snapshot, train_steps
from safetensors.torch import load_file

from grafting import PeftModel, get_peft_model
from grafting.testing import assert_close, model_output, sample_inputs, tiny_model
from grafting_prefix.encoders import PromptTable

CASES = [("llama", "CAUSAL_LM"), ("gpt2", "CAUSAL_LM"), ("bert", "SEQ_CLS")]
ENCODERS = ("p_mlp", "p_lstm")
N = 3


def labels_for(arch: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.tensor([1, 0]) if arch == "bert" else inputs["input_ids"]


@pytest.mark.parametrize("method", ENCODERS)
@pytest.mark.parametrize(("arch", "task"), CASES)
def test_peft_saves_grafting_loads(method: str, arch: str, task: str, tmp_path) -> None:
    inputs = sample_inputs(arch, seed=11)
    torch.manual_seed(11)
    theirs = peft.get_peft_model(tiny_model(arch, seed=11), configs(method, task, N)[1]).eval()
    expected = model_output(theirs, inputs)
    theirs.save_pretrained(tmp_path)

    ours = PeftModel.from_pretrained(tiny_model(arch, seed=11), tmp_path)
    base = model_output(tiny_model(arch, seed=11), inputs)
    assert_prompted(model_output(ours, inputs), expected, base, "PEFT's tokens in grafting")
    if task == "CAUSAL_LM":
        with torch.no_grad():
            ids = ours.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert torch.equal(ids, greedy_reference(theirs, inputs["input_ids"], 4))


@pytest.mark.parametrize("method", ENCODERS)
@pytest.mark.parametrize(("arch", "task"), CASES)
def test_grafting_saves_peft_loads(method: str, arch: str, task: str, tmp_path) -> None:
    inputs = sample_inputs(arch, seed=12)
    torch.manual_seed(12)
    ours = get_peft_model(tiny_model(arch, seed=12), configs(method, task, N)[0]).eval()
    expected = model_output(ours, inputs)
    ours.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"]
    adapter = ours.base_model.model_adapters["default"]
    with torch.no_grad():  # the encoder's output, not its table
        assert_close(saved, adapter.encoder(), changed_from=adapter.encoder.embedding.weight, msg="saved tokens")

    theirs = peft.PeftModel.from_pretrained(tiny_model(arch, seed=12), tmp_path).eval()
    base = model_output(tiny_model(arch, seed=12), inputs)
    assert_prompted(model_output(theirs, inputs), expected, base, "grafting's tokens in PEFT")
    if task == "CAUSAL_LM":
        with torch.no_grad():
            ids = ours.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert torch.equal(ids, greedy_reference(theirs, inputs["input_ids"], 4))


@pytest.mark.parametrize(("method", "arch", "task"), [("p_lstm", "gpt2", "CAUSAL_LM"), ("p_mlp", "bert", "SEQ_CLS")])
def test_training_changes_only_the_encoder_and_reloading_is_exact(method: str, arch: str, task: str, tmp_path) -> None:
    inputs = sample_inputs(arch, seed=13)
    torch.manual_seed(13)
    ours = get_peft_model(tiny_model(arch, seed=13), configs(method, task, N)[0])
    assert len(adapter_parameters(ours)) > 1  # the table and the encoder's weights
    before = snapshot(ours)
    train_steps(ours, inputs, labels_for(arch, inputs))
    after = snapshot(ours)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    adapter, heads = set(adapter_parameters(ours)), {n for n in before if "modules_to_save" in n}
    assert changed & adapter
    assert changed <= adapter | heads

    expected = model_output(ours, inputs)
    base = model_output(tiny_model(arch, seed=13), inputs)
    with ours.disable_adapter():
        assert_prompted(model_output(ours, inputs), base, expected, "disabled")
    ours.save_pretrained(tmp_path)
    for trainable in (False, True):
        loaded = PeftModel.from_pretrained(tiny_model(arch, seed=13), tmp_path, is_trainable=trainable)
        assert_prompted(model_output(loaded, inputs), expected, base, "reloaded")
        encoder = loaded.base_model.model_adapters["default"].encoder
        assert isinstance(encoder, PromptTable)  # PEFT's format keeps the tokens, not the encoder
        assert encoder.embedding.weight.requires_grad is trainable
    # the reloaded trainable adapter trains its tokens directly
    before = snapshot(loaded)
    train_steps(loaded, inputs, labels_for(arch, inputs), steps=1)
    changed = {n for n, p in loaded.named_parameters() if not torch.equal(before[n], p)}
    assert changed & set(adapter_parameters(loaded))
    assert changed <= set(adapter_parameters(loaded)) | {n for n in before if "modules_to_save" in n}


def test_saved_tokens_are_the_eval_mode_output() -> None:
    """With encoder dropout, saving in train mode still writes the deterministic tokens."""
    config = configs("p_lstm", "CAUSAL_LM", N, encoder_num_layers=2, encoder_dropout=0.5)[0]
    ours = get_peft_model(tiny_model("gpt2"), config)
    ours.train()
    adapter = ours.base_model.model_adapters["default"]
    first, second = adapter.peft_state_dict()["prompt_embeddings"], adapter.peft_state_dict()["prompt_embeddings"]
    assert_close(first, second, changed_from=adapter.encoder.embedding.weight, msg="saved twice")
    assert adapter.training  # the mode is restored
    adapter.eval()
    with torch.no_grad():
        assert_close(first, adapter.encoder(), changed_from=adapter.encoder.embedding.weight, msg="eval-mode tokens")
