"""trainable_token_indices beside a LoRA adapter on the same embedding, both active: the two deltas add up,
merge = unmerge, per-sample routing = each adapter alone, save → load identical."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_option_helpers import F64, TOL

from grafting import LoraConfig, PeftModel, get_peft_model
from grafting.model.routing import BASE
from grafting.testing import assert_close, assert_identical, tiny_model


def base() -> torch.nn.Module:
    return tiny_model("llama").to(F64)


def ids(batch: int = 3) -> torch.Tensor:
    out = torch.randint(0, 64, (batch, 7), generator=torch.Generator().manual_seed(0))
    out[:, :2] = torch.tensor([1, 3])
    return out


def embedded(model: Any, **kwargs: Any) -> torch.Tensor:
    """The input embedding's output, where both adapters act."""
    with torch.no_grad():
        return model.get_input_embeddings()(ids(), **kwargs)


def logits(model: Any, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids(), **kwargs).logits


@settings(max_examples=4, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 63), min_size=1, max_size=4, unique=True).map(lambda t: sorted({1, *t})),
    r=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_tokens_and_lora_on_one_embedding(tmp_path_factory: Any, tokens: list[int], r: int, seed: int) -> None:
    model = get_peft_model(base(), LoraConfig(target_modules=["q_proj"], trainable_token_indices=tokens))
    model.add_adapter("lora", LoraConfig(r=r, target_modules=["embed_tokens"], init_lora_weights=False))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if ".adapters." in n):
            p.add_(torch.randn(p.shape, generator=gen, dtype=F64) * 0.3)
    plain = embedded(base())
    alone = {}
    for name in ("default", "lora"):
        model.set_adapter(name)
        alone[name] = embedded(model), logits(model)
    model.base_model.set_adapter(["default", "lora"])
    both = embedded(model)
    expected = alone["default"][0] + alone["lora"][0] - plain  # two deltas on one layer add up
    assert_close(both, expected, changed_from=alone["lora"][0], **TOL)
    out = logits(model)
    model.merge_adapter()
    assert_close(logits(model), out, changed_from=alone["lora"][1], **TOL)
    model.unmerge_adapter()
    assert_close(logits(model), out, **TOL)
    routed = logits(model, adapter_names=["lora", BASE, "default"])
    reference = torch.stack([alone["lora"][1][0], logits(base())[1], alone["default"][1][2]])
    assert_close(routed, reference, changed_from=logits(base()), **TOL)
    folder = tmp_path_factory.mktemp("tokens-lora")
    model.save_pretrained(folder)
    loaded = PeftModel.from_pretrained(base(), folder)
    loaded.load_adapter(folder / "lora", adapter_name="lora")
    loaded.base_model.set_adapter(["default", "lora"])
    assert_identical(logits(loaded), out)
