"""Per-sample routing in training: each adapter learns from the samples routed to it, and from nothing else.

Training a batch whose samples are routed to different adapters (``adapter_names=``) must give each
adapter exactly the updates it gets when trained alone on its own samples: the same gradients, hence
the same parameters after several optimizer steps. Checked for every layer method and for adapters of
different methods on the same layers; model-level (prompt-family) adapters are refused.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import grafting
from grafting.errors import AdapterStateError
from grafting.model.routing import BASE
from grafting.testing import adapter_parameters, assert_close, assert_identical, randomize_adapters, tiny_llama

BATCH, LENGTH, STEPS = 6, 5, 3
ATTENTION = ["q_proj", "v_proj"]


def _lora() -> Any:
    return grafting.LoraConfig(r=2, lora_alpha=4, target_modules=[*ATTENTION, "down_proj"])


def _loha() -> Any:
    return grafting.LoHaConfig(r=2, alpha=4, target_modules=[*ATTENTION, "up_proj"])


def _ia3() -> Any:
    return grafting.IA3Config(target_modules=[*ATTENTION, "down_proj"], feedforward_modules=["down_proj"])


def _vera(seed: int) -> Callable[[], Any]:
    return lambda: grafting.VeraConfig(r=4, target_modules=ATTENTION, projection_prng_key=seed)


#: adapter name -> config factory, per case; "mixed" puts three methods on the same attention layers
CASES: dict[str, dict[str, Callable[[], Any]]] = {
    "lora": {"a": _lora, "b": _lora},
    "loha": {"a": _loha, "b": _loha},
    "ia3": {"a": _ia3, "b": _ia3},
    "vera": {"a": _vera(1), "b": _vera(2)},
    "mixed": {"a": _lora, "b": _loha, "c": _ia3, "d": _vera(3)},
}


def _model(case: str, seed: int) -> grafting.PeftModel:
    """A float64 tiny Llama holding the case's adapters, randomized (so every factor gets a gradient), all trainable."""
    factories = CASES[case]
    (first, make_first), *rest = factories.items()
    model = grafting.get_peft_model(tiny_llama(seed=seed).double(), make_first(), adapter_name=first, mixed=True)
    for name, make in rest:
        model.add_adapter(name, make())
    model.double()
    randomize_adapters(model, seed=seed)
    model.set_adapter(list(factories))
    return model


def _loss(model: grafting.PeftModel, ids: torch.Tensor, **routing: Any) -> torch.Tensor:
    """Next-token cross-entropy summed over every position of every sample (so it splits over samples)."""
    logits = model(input_ids=ids, **routing).logits[:, :-1]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
    )


def _routed_steps(model: grafting.PeftModel, batches: list[torch.Tensor], names: list[str]) -> None:
    params = list(adapter_parameters(model).values())
    optimizer = torch.optim.SGD(params, lr=0.05)
    for ids in batches:
        optimizer.zero_grad(set_to_none=True)
        _loss(model, ids, adapter_names=names).backward()
        optimizer.step()


def _separate_steps(model: grafting.PeftModel, batches: list[torch.Tensor], names: list[str]) -> None:
    """The same steps, each adapter trained alone on the rows routed to it (the base rows train nothing)."""
    params = list(adapter_parameters(model).values())
    optimizer = torch.optim.SGD(params, lr=0.05)
    everyone = list(model.peft_config)
    for ids in batches:
        optimizer.zero_grad(set_to_none=True)
        for name in everyone:
            rows = [i for i, n in enumerate(names) if n == name]
            if rows:
                model.set_adapter(name)  # this adapter alone, and only it trainable
                _loss(model, ids[rows]).backward()
        model.set_adapter(everyone)
        optimizer.step()


@settings(max_examples=2, deadline=None)
@pytest.mark.parametrize("case", list(CASES))
@given(seed=st.integers(0, 2**16), data=st.data())
def test_routed_training_equals_training_each_adapter_on_its_own_samples(
    case: str, seed: int, data: st.DataObject
) -> None:
    names = data.draw(st.lists(st.sampled_from([*CASES[case], BASE]), min_size=BATCH, max_size=BATCH), label="names")
    routed = _model(case, seed)
    separate = copy.deepcopy(routed)
    start = {k: v.detach().clone() for k, v in adapter_parameters(routed).items()}
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(1, 64, (BATCH, LENGTH), generator=gen) for _ in range(STEPS)]

    _routed_steps(routed, batches, names)
    _separate_steps(separate, batches, names)

    for name in CASES[case]:
        got, expected = adapter_parameters(routed, name), adapter_parameters(separate, name)
        before = {key: start[key] for key in expected}
        if name in names:  # the same training; and it moved the adapter
            assert_close(got, {k: v.detach() for k, v in expected.items()}, changed_from=before, msg=name)
        else:  # no sample was routed to it: not a single bit changed
            assert_identical(got, before, msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_a_routed_batch_gives_gradients_only_to_the_adapters_it_names(case: str) -> None:
    model = _model(case, 0)
    ids = torch.randint(1, 64, (2, LENGTH), generator=torch.Generator().manual_seed(0))
    first = next(iter(CASES[case]))
    _loss(model, ids, adapter_names=[first, BASE]).backward()
    for key, p in adapter_parameters(model).items():
        if f".{first}." in key or key.endswith(f".{first}"):
            assert p.grad is not None
            assert p.grad.abs().max() > 0, key
        else:
            assert p.grad is None or not p.grad.any(), f"{key} got a gradient from samples routed elsewhere"


def test_routing_with_a_prompt_adapter_active_is_refused_and_changes_nothing() -> None:
    """Prompt tuning changes the whole batch's sequence: per-sample adapter_names is one clear error."""
    config = grafting.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    model = grafting.get_peft_model(tiny_llama(), config, adapter_name="prompt")
    ids = torch.randint(1, 64, (2, LENGTH), generator=torch.Generator().manual_seed(0))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterStateError, match="adapter_names cannot route samples while a model-level adapter"):
        _loss(model, ids, adapter_names=["prompt", BASE])
    assert_identical(model.state_dict(), before)
