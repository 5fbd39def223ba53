"""torch.compile traces adapted models whole: no graph break in adapted layers, no recompile across steps."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import grafting
from grafting.testing import tiny_llama

pytestmark = pytest.mark.xdist_group("compile")  # dynamo's caches are per process: keep these together


def _model(**options: object) -> torch.nn.Module:
    base = tiny_llama(hidden=16, layers=1).to(torch.bfloat16)
    config = grafting.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)
    return grafting.get_peft_model(base, config, **options)


@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_training_and_inference_compile_without_breaks_or_recompiles(autocast_adapter_dtype: bool) -> None:
    torch._dynamo.reset()
    model = _model(autocast_adapter_dtype=autocast_adapter_dtype)
    model.add_adapter("other", grafting.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(3):  # the embeddings' output needs no grad, the adapted layers' inputs do: one graph
        compiled(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert counter.frame_count == 1, "a training step is one graph, compiled once"
    model.eval()
    with torch.no_grad():
        for _ in range(2):
            compiled(input_ids=ids)
        assert counter.frame_count == 2, "inference adds one graph (grad mode), compiled once"
        for _ in range(2):
            compiled(input_ids=ids, adapter_names=["other", "default"])
    assert counter.frame_count == 3, "per-sample routing adds one graph, compiled once"


def test_explain_finds_no_graph_break() -> None:
    torch._dynamo.reset()
    model = _model()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    model.train()
    explained = torch._dynamo.explain(lambda: model(input_ids=ids, labels=ids).loss)()
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
