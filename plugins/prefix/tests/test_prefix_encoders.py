"""Prefix tuning on encoder-only models (BERT classification, a custom encoder), against PEFT.

transformers 5's encoder task heads list no key/value cache in their forward: they pass ``**kwargs`` on
to their backbone, whose attention takes one (renamed ``cache``). grafting hands the prefix that way.
PEFT 0.21.2 looks for a backbone parameter named ``past_key_values`` and refuses BERT; the oracle below
adds that name to the backbone's signature (``_peft_can_see_the_cache``) so that PEFT's own code runs.
A model whose attention takes no cache at all (DeBERTa-v2) is refused: PEFT runs it but drops the prefix.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from prefix_helpers import configs
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from grafting import PeftModel, UnsupportedLayerError, get_peft_model
from grafting.testing import assert_close, assert_identical

N = 3
VOCAB = 40


def _bert(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


def _roberta(seed: int) -> nn.Module:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=32,
        max_position_embeddings=40,
        num_labels=3,
        pad_token_id=1,
    )
    return RobertaForSequenceClassification(config).eval()


class TinyEncoderConfig(PretrainedConfig):
    model_type = "grafting-tiny-encoder"

    def __init__(self, hidden_size: int = 16, num_hidden_layers: int = 2, num_attention_heads: int = 2, **kw: Any):
        super().__init__(**kw)
        self.vocab_size = VOCAB
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = (
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
        )


class TinyEncoder(PreTrainedModel):
    """A bidirectional encoder written outside transformers: its attention reads a ``past_key_values`` cache."""

    config_class = TinyEncoderConfig

    def __init__(self, config: TinyEncoderConfig) -> None:
        super().__init__(config)
        width = config.hidden_size
        self.embed = nn.Embedding(VOCAB, width)
        self.qkv = nn.ModuleList(nn.Linear(width, 3 * width) for _ in range(config.num_hidden_layers))
        self.out = nn.ModuleList(nn.Linear(width, width) for _ in range(config.num_hidden_layers))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        **_: Any,
    ) -> BaseModelOutput:
        heads = self.config.num_attention_heads
        hidden = self.embed(input_ids)
        batch, length, width = hidden.shape
        for i, (qkv, out) in enumerate(zip(self.qkv, self.out, strict=True)):
            q, k, v = (t.view(batch, length, heads, -1).transpose(1, 2) for t in qkv(hidden).chunk(3, dim=-1))
            if past_key_values is not None:
                k, v = past_key_values.update(k, v, i)
            bias = None
            if attention_mask is not None:
                bias = (1.0 - attention_mask[:, None, None, -k.shape[2] :].to(q.dtype)) * -1e4
            mixed = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            hidden = hidden + out(mixed.transpose(1, 2).reshape(batch, length, width))
        return BaseModelOutput(last_hidden_state=hidden)


def _custom(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return TinyEncoder(TinyEncoderConfig()).eval()


def _peft_can_see_the_cache(model: nn.Module) -> nn.Module:
    """Give BERT's (RoBERTa's) backbone a forward that lists ``past_key_values`` (transformers 5 still accepts the name)."""
    backbone = model.base_model
    original = backbone.forward

    def forward(*args: Any, past_key_values: Any = None, **kwargs: Any) -> Any:
        return original(*args, past_key_values=past_key_values, **kwargs)

    backbone.forward = forward
    return model


def _inputs(seed: int, types: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 6), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # right padding in one row
    inputs = {"input_ids": ids, "attention_mask": mask}
    if types:
        inputs["token_type_ids"] = (torch.arange(6) >= 3).long().expand(2, -1).clone()
    return inputs


def _output(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _randomize(model: nn.Module, seed: int) -> None:
    """Move the trainable parameters away from their initialization (zero classifier bias, ...)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda item: item[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)


CASES = {
    "bert-SEQ_CLS": (_bert, "SEQ_CLS", True),
    "roberta-SEQ_CLS": (_roberta, "SEQ_CLS", False),
    "custom-FEATURE_EXTRACTION": (_custom, "FEATURE_EXTRACTION", False),
}


def _peft_model(kind: str, seed: int) -> Any:
    build, task, _ = CASES[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(_peft_can_see_the_cache(build(seed)), configs("prefix", task, N)[1]).eval()


@pytest.mark.parametrize("kind", list(CASES))
def test_peft_s_prefix_loads_into_grafting_with_the_same_outputs(kind: str, tmp_path: Path) -> None:
    build, _, types = CASES[kind]
    inputs = _inputs(51, types)
    theirs = _peft_model(kind, 51)
    _randomize(theirs, 5)
    expected = _output(theirs, inputs)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(build(51), tmp_path)
    assert_close(_output(ours, inputs), expected, changed_from=_output(build(51), inputs))


@pytest.mark.parametrize("kind", list(CASES))
def test_grafting_s_prefix_loads_into_peft_with_the_same_outputs(kind: str, tmp_path: Path) -> None:
    build, task, types = CASES[kind]
    inputs = _inputs(52, types)
    ours = get_peft_model(build(52), configs("prefix", task, N)[0]).eval()
    _randomize(ours, 6)
    expected = _output(ours, inputs)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_peft_can_see_the_cache(build(52)), str(tmp_path)).eval()
    assert_close(_output(theirs, inputs), expected, changed_from=_output(build(52), inputs))
    with ours.disable_adapter():
        assert_close(_output(ours, inputs), _output(build(52), inputs))


@pytest.mark.parametrize("kind", list(CASES))
def test_training_changes_the_prefix_and_what_peft_trains_only(kind: str) -> None:
    build, task, types = CASES[kind]
    inputs = _inputs(53, types)
    ours = get_peft_model(build(53), configs("prefix", task, N)[0])
    theirs = _peft_model(kind, 53)
    trained = {n for n, p in ours.named_parameters() if p.requires_grad}
    peft_trained = {n for n, p in theirs.named_parameters() if p.requires_grad}
    head = {n.split(".", 1)[1] for n in peft_trained if "modules_to_save" in n}  # BERT's classifier, as PEFT's
    assert {n.split(".", 2)[2] for n in trained if "modules_to_save" in n} == head  # (grafting: base_model.model.)
    assert len(trained) == len(peft_trained)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    ours.train()
    for _ in range(3):
        out = ours(**inputs)
        loss = (out.logits if task == "SEQ_CLS" else out.last_hidden_state).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in ours.named_parameters():
        if name in trained:
            assert not torch.equal(param, before[name]), f"{name} did not train"
        else:
            assert_identical(param, before[name])


def test_an_encoder_whose_attention_takes_no_cache_is_refused_where_peft_drops_the_prefix() -> None:
    from transformers import DebertaV2Config, DebertaV2Model

    def deberta() -> nn.Module:
        torch.manual_seed(54)
        config = DebertaV2Config(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32
        )
        return DebertaV2Model(config).eval()

    inputs = {"input_ids": _inputs(54, types=False)["input_ids"]}  # with a mask PEFT's call fails (9 vs 6 columns)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(deberta(), configs("prefix", "FEATURE_EXTRACTION", N)[1]).eval()
    _randomize(theirs, 7)
    # PEFT's prefix never reaches DeBERTa-v2's attention: its output is the base model's
    assert_identical(_output(theirs, inputs), _output(deberta(), inputs))
    model = deberta()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(UnsupportedLayerError, match=r"DebertaV2Model\.forward takes no key/value cache"):
        get_peft_model(model, configs("prefix", "FEATURE_EXTRACTION", N)[0])
    for name, value in model.state_dict().items():
        assert_identical(value, before[name])
    assert not any("adapter" in n for n, _ in model.named_modules())


def test_a_backbone_that_drops_the_cache_is_an_error_not_the_base_output() -> None:
    model = get_peft_model(_bert(55), configs("prefix", "SEQ_CLS", N)[0]).eval()
    bert = model.get_base_model().bert
    original = bert.forward

    def dropping(*args: Any, cache: Any = None, **kwargs: Any) -> Any:  # lists a cache, uses none
        return original(*args, **kwargs)

    bert.forward = dropping
    with pytest.raises(UnsupportedLayerError, match="did not read it"):
        model(input_ids=_inputs(55, types=True)["input_ids"])  # no mask, whose length would betray it
