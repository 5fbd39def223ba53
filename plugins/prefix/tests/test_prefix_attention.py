"""Prefix tuning's padded-query attention (SDPA's causal kernels) against the model's own masked attention."""

from __future__ import annotations

import pytest
import torch

from grafting import PrefixTuningConfig, get_peft_model
from grafting.testing import assert_close, tiny_llama
from grafting_prefix import attention
from grafting_prefix.prefix import PrefixAdapter

N = 4


def _model(dtype: torch.dtype = torch.float32, implementation: str = "sdpa"):
    base = tiny_llama(hidden=32, seed=5).to(dtype)
    base.config._attn_implementation = implementation
    torch.manual_seed(6)
    model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    with torch.no_grad():  # a prefix far from the initial one, so that it moves the logits
        for p in model.base_model.model_adapters.parameters():
            p.normal_(0, 2)
    return model


def _step(model, padded: bool, ids: torch.Tensor, mask: torch.Tensor | None = None):
    PrefixAdapter.padded_attention = padded
    try:
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
    finally:
        PrefixAdapter.padded_attention = True
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), out.loss.detach(), grads


def _spy(monkeypatch) -> list[tuple[int, int, bool]]:
    """Records (queries, keys, mask given) of every call of the padded-query attention."""
    seen: list[tuple[int, int, bool]] = []
    original = attention.prefix_sdpa_attention

    def spy(module, query, key, value, mask, **kwargs):
        seen.append((query.shape[2], key.shape[2], mask is not None))
        return original(module, query, key, value, mask, **kwargs)

    attention._register()
    from transformers import AttentionInterface

    monkeypatch.setitem(AttentionInterface._global_mapping, attention.NAME, spy)
    return seen


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "all-ones-mask"])
def test_padded_queries_compute_the_masked_attention(monkeypatch, with_mask: bool) -> None:
    """Logits, loss and the prefix's gradient equal the model's own masked SDPA; the fast path was taken."""
    model = _model()
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids) if with_mask else None
    logits_ref, loss_ref, grads_ref = _step(model, False, ids, mask)
    seen = _spy(monkeypatch)
    logits, loss, grads = _step(model, True, ids, mask)
    assert seen == [(9, 9 + N, False)] * 2, "each layer: no mask, fewer queries than keys"
    assert model.get_base_model().config._attn_implementation == "sdpa", "the model gets its SDPA back"
    with torch.no_grad(), model.disable_adapter():
        plain = model(input_ids=ids).logits
    assert_close(logits, logits_ref, changed_from=plain)
    assert_close(loss, loss_ref)
    assert grads.keys() == grads_ref.keys()
    assert grads
    assert_close(grads, grads_ref)


def test_padding_and_decoding_keep_the_masked_path(monkeypatch) -> None:
    """A padded batch gets transformers' mask (and the same result); generation agrees token for token."""
    model = _model()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    logits_ref, _, grads_ref = _step(model, False, ids, mask)
    seen = _spy(monkeypatch)
    logits, _, grads = _step(model, True, ids, mask)
    assert seen
    assert all(given for _, _, given in seen), "a padding mask is applied as transformers builds it"
    assert_close(logits[1], logits_ref[1])
    assert_close(logits[0, 3:], logits_ref[0, 3:])
    assert_close(grads, grads_ref)
    model.eval()
    with torch.no_grad():
        PrefixAdapter.padded_attention = False
        expected = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        PrefixAdapter.padded_attention = True
        seen.clear()
        generated = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, expected)
    assert model.get_base_model().config._attn_implementation == "sdpa"


def test_bf16_agrees_within_rounding() -> None:
    model = _model(torch.bfloat16)
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(2))
    logits_ref, _, grads_ref = _step(model, False, ids)
    logits, _, grads = _step(model, True, ids)
    eps = torch.finfo(torch.bfloat16).eps
    assert ((logits.float() - logits_ref.float()).norm() / logits_ref.float().norm()).item() <= 2 * eps
    for name, grad in grads.items():
        ref = grads_ref[name].float()
        assert ((grad.float() - ref).norm() / ref.norm()).item() <= 4 * eps, name


def test_other_attention_implementations_are_left_alone(monkeypatch) -> None:
    model = _model(implementation="eager")
    seen = _spy(monkeypatch)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    model(input_ids=ids)
    assert seen == []
    assert model.get_base_model().config._attn_implementation == "eager"
