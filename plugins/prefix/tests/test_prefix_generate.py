"""generate with virtual tokens: a left-padded row decodes as it does alone (the mask covers the virtual positions)."""

from __future__ import annotations

import pytest
import torch
from prefix_helpers import configs

from grafting import get_peft_model
from grafting.testing import assert_close, tiny_model

PAD = 3


@pytest.mark.parametrize("method", ["prompt", "p_mlp", "prefix", "prefix_proj"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_left_padded_row_generates_as_it_does_alone(arch: str, method: str) -> None:
    torch.manual_seed(41)
    ours = get_peft_model(tiny_model(arch, seed=41), configs(method, "CAUSAL_LM", 3)[0]).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [PAD, PAD, 11, 12, 13, 14]])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        batch = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=PAD)
        for row, start in ((0, 0), (1, 2)):
            alone = ours.generate(
                input_ids=ids[row : row + 1, start:], max_new_tokens=5, do_sample=False, pad_token_id=PAD
            )
            assert torch.equal(batch[row, start:], alone[0])
    options = {"max_new_tokens": 1, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad():
        scores = ours.generate(input_ids=ids, attention_mask=mask, pad_token_id=PAD, **options).scores[0]
        with ours.disable_adapter():
            plain = ours.generate(input_ids=ids, attention_mask=mask, pad_token_id=PAD, **options).scores[0]
    assert_close(scores, scores, changed_from=plain, msg="first step")  # the virtual tokens reach it
