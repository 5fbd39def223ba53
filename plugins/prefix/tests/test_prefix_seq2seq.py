"""Prompt tuning and P-tuning on an encoder-decoder model (T5): the prompts go to the encoder only."""

from __future__ import annotations

import peft
import pytest
import torch
from prefix_helpers import configs
from safetensors.torch import load_file

from grafting import PeftModel, get_peft_model
from grafting.testing import assert_close, model_output, sample_inputs, tiny_model

METHODS = ("prompt", "p_mlp")
N = 3


def encoder_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}


def greedy_seq2seq(model: torch.nn.Module, inputs: dict[str, torch.Tensor], steps: int) -> torch.Tensor:
    """Greedy decoding by a full forward pass per step, without a cache (T5's tiny config has no eos in reach)."""
    start = torch.zeros(inputs["input_ids"].shape[0], 1, dtype=torch.long)  # decoder_start_token_id
    out = start
    for _ in range(steps):
        with torch.no_grad():
            logits = model(**encoder_inputs(inputs), decoder_input_ids=out).logits
        out = torch.cat([out, logits[:, -1:].argmax(-1)], dim=1)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_peft_saves_grafting_loads(method: str, tmp_path) -> None:
    inputs = sample_inputs("t5", seed=31)
    torch.manual_seed(31)
    theirs = peft.get_peft_model(tiny_model("t5", seed=31), configs(method, "SEQ_2_SEQ_LM", N)[1]).eval()
    expected = model_output(theirs, inputs)
    base = model_output(tiny_model("t5", seed=31), inputs)
    theirs.save_pretrained(tmp_path)
    # the file holds a second block of rows for the decoder, which the forward does not use
    assert load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"].shape == (2 * N, 16)

    ours = PeftModel.from_pretrained(tiny_model("t5", seed=31), tmp_path)
    assert_close(model_output(ours, inputs), expected, changed_from=base, msg="PEFT's tokens in grafting")
    labels = inputs["decoder_input_ids"]
    with torch.no_grad():
        loss = ours(**encoder_inputs(inputs), labels=labels).loss
        assert_close(loss, theirs(**encoder_inputs(inputs), labels=labels).loss, msg="loss")
        ids = ours.generate(**encoder_inputs(inputs), max_new_tokens=4, do_sample=False)
        reference = theirs.generate(**encoder_inputs(inputs), max_new_tokens=4, do_sample=False)
    assert torch.equal(ids, reference)  # PEFT's seq2seq generate needs no cache tricks, so it is an oracle here
    assert torch.equal(ids, greedy_seq2seq(theirs, inputs, 4))


@pytest.mark.parametrize("method", METHODS)
def test_grafting_saves_peft_loads_and_disabled_is_the_base(method: str, tmp_path) -> None:
    inputs = sample_inputs("t5", seed=32)
    torch.manual_seed(32)
    ours = get_peft_model(tiny_model("t5", seed=32), configs(method, "SEQ_2_SEQ_LM", N)[0]).eval()
    expected = model_output(ours, inputs)
    base = model_output(tiny_model("t5", seed=32), inputs)
    with ours.disable_adapter():
        assert_close(model_output(ours, inputs), base, changed_from=expected, msg="disabled")
    ours.save_pretrained(tmp_path)
    assert ours.peft_config["default"].num_transformer_submodules == 2

    theirs = peft.PeftModel.from_pretrained(tiny_model("t5", seed=32), tmp_path).eval()
    assert_close(model_output(theirs, inputs), expected, changed_from=base, msg="grafting's tokens in PEFT")
    with torch.no_grad():
        ids = ours.generate(**encoder_inputs(inputs), max_new_tokens=4, do_sample=False)
    assert torch.equal(ids, greedy_seq2seq(theirs, inputs, 4))
    loaded = PeftModel.from_pretrained(tiny_model("t5", seed=32), tmp_path)
    assert_close(model_output(loaded, inputs), expected, changed_from=base, msg="reloaded")
