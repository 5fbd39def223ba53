"""prepare_model_for_kbit_training and cast_mixed_precision_params on bitsandbytes layers, against PEFT's."""

from __future__ import annotations

import warnings

import pytest
import torch
from grafting_bnb import quantize_linears

import grafting
from grafting.testing import sample_inputs, tiny_llama

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import peft

INPUTS = sample_inputs("llama")


def half_quantized(bits: int) -> torch.nn.Module:
    """A bfloat16 Llama whose linear layers (not the head) are bitsandbytes k-bit layers, flagged as transformers does."""
    model = quantize_linears(tiny_llama(hidden=64).to(torch.bfloat16), bits=bits, compute_dtype=torch.bfloat16)
    setattr(model, f"is_loaded_in_{bits}bit", True)  # what transformers sets; PEFT reads these flags
    return model.train()


def _state(model: torch.nn.Module) -> dict[str, tuple[torch.dtype, str, bool]]:
    return {n: (p.dtype, type(p).__name__, p.requires_grad) for n, p in model.named_parameters()}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(
    "kwargs", [{}, {"gradient_checkpointing_kwargs": {"use_reentrant": False}}], ids=["reentrant", "non-reentrant"]
)
def test_prepare_model_for_kbit_training_does_what_peft_does(bits, kwargs):
    ours = grafting.prepare_model_for_kbit_training(half_quantized(bits), **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.prepare_model_for_kbit_training(half_quantized(bits), **kwargs)
    state = _state(ours)
    assert state == _state(theirs)
    assert not any(requires_grad for _, _, requires_grad in state.values())  # frozen
    norms = [dtype for name, (dtype, _, _) in state.items() if "norm" in name]
    assert norms
    assert set(norms) == {torch.float32}
    quantized = [dtype for name, (dtype, kind, _) in state.items() if kind in ("Params4bit", "Int8Params")]
    assert quantized
    assert torch.float32 not in quantized
    assert ours.is_gradient_checkpointing
    assert theirs.is_gradient_checkpointing
    embedded = ours.get_input_embeddings()(INPUTS["input_ids"])
    expected = theirs.get_input_embeddings()(INPUTS["input_ids"])
    assert embedded.requires_grad == expected.requires_grad
    if not kwargs:  # reentrant checkpoints need the embeddings' output to require grad
        assert embedded.requires_grad


@pytest.mark.parametrize("bits", [4, 8])
def test_adapters_on_a_prepared_kbit_model_get_gradients_through_checkpoints(bits):
    model = grafting.prepare_model_for_kbit_training(half_quantized(bits))
    model = grafting.get_peft_model(
        model, grafting.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    model(**INPUTS, labels=INPUTS["input_ids"]).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_cast_mixed_precision_params_as_peft():
    def build(lib):
        model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(r=2, target_modules=["q_proj"]))
        lib.cast_mixed_precision_params(model, torch.bfloat16)
        return {
            n.replace(".adapters.default", "").replace(".default", ""): p.dtype for n, p in model.named_parameters()
        }

    ours = build(grafting)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = build(peft)
    assert sorted(map(str, ours.values())) == sorted(map(str, theirs.values()))
    assert {d for n, d in ours.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in ours.items() if "lora_" not in n} == {torch.bfloat16}


def test_cast_mixed_precision_params_keeps_quantized_storage():
    model = grafting.get_peft_model(
        quantize_linears(tiny_llama(hidden=64), bits=4), grafting.LoraConfig(r=2, target_modules=["q_proj"])
    )
    before = {n: p.dtype for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"}
    grafting.cast_mixed_precision_params(model, torch.float16)
    assert before == {n: p.dtype for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"}
    assert model(**INPUTS).logits.isfinite().all()


def test_gradient_checkpointing_before_wrapping_still_trains_the_adapter():
    """PEFT enables input grads when it wraps a checkpointed model; so does grafting."""
    model = tiny_llama().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model = grafting.get_peft_model(model, grafting.LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    model(**INPUTS, labels=INPUTS["input_ids"]).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
