"""Hot-swap (``hotswap_adapter``, ``prepare_model_for_compiled_hotswap``): a compiled model takes other saved
adapters of the same method, of other ranks and alphas, without recompiling, and computes what a freshly loaded
model computes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

import grafting
from grafting.api.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from grafting.errors import AdapterLoadError, AdapterStateError, MergeError
from grafting.testing import assert_close, assert_identical, randomize_adapters, tiny_llama

ATTN = ["q_proj", "v_proj"]
#: (rank, alpha, rsLoRA, DoRA) of the adapters swapped in turn; the first is the one compiled
VARIANTS = [(2, 4, False, False), (4, 3, False, False), (1, 8, True, False), (3, 5, False, False)]


def _save(folder: Path, seed: int, r: int, alpha: float, rslora: bool = False, dora: bool = False, **kw: Any) -> Path:
    config = grafting.LoraConfig(
        r=r, lora_alpha=alpha, use_rslora=rslora, use_dora=dora, target_modules=kw.pop("targets", ATTN), **kw
    )
    model = grafting.get_peft_model(tiny_llama(), config)
    randomize_adapters(model, seed=seed)
    model.save_pretrained(folder)
    return folder


def _fresh(folder: Path) -> grafting.PeftModel:
    return grafting.PeftModel.from_pretrained(tiny_llama(), folder)


def _graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


@pytest.fixture
def saved(tmp_path: Path) -> list[Path]:
    return [_save(tmp_path / f"a{i}", i + 1, *variant) for i, variant in enumerate(VARIANTS)]


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_swaps_in_a_compiled_model_never_recompile_and_match_a_fresh_load(saved: list[Path], mode: str) -> None:
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    model = grafting.PeftModel.from_pretrained(tiny_llama(), saved[0], is_trainable=mode == "training")
    prepare_model_for_compiled_hotswap(model, target_rank=max(r for r, *_ in VARIANTS))
    model.train(mode == "training")
    with model.disable_adapter(), torch.no_grad():
        base = model(input_ids=ids).logits
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")

    def run() -> torch.Tensor:
        if mode == "inference":
            with torch.no_grad():
                return compiled(input_ids=ids).logits
        out = compiled(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.logits.detach()

    assert_close(run(), _fresh(saved[0]).train(mode == "training")(input_ids=ids).logits.detach(), changed_from=base)
    graphs = _graphs()
    assert graphs >= 1
    with torch.compiler.set_stance("fail_on_recompile"):
        for folder in [*saved[1:], saved[0]]:
            hotswap_adapter(compiled, folder, adapter_name="default")
            expected = _fresh(folder).train(mode == "training")(input_ids=ids).logits.detach()
            assert_close(run(), expected, changed_from=base, msg=f"after swapping in {folder.name}")
    assert _graphs() == graphs  # not one more graph: zero recompiles across the swaps


def test_dora_swaps_without_recompiling(tmp_path: Path) -> None:
    first = _save(tmp_path / "d0", 1, 2, 4, dora=True)
    second = _save(tmp_path / "d1", 2, 2, 7, dora=True)
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    model = grafting.PeftModel.from_pretrained(tiny_llama(), first)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(input_ids=ids)
        graphs = _graphs()
        with torch.compiler.set_stance("fail_on_recompile"):
            hotswap_adapter(compiled, second, "default")
            got = compiled(input_ids=ids).logits
    assert _graphs() == graphs
    with torch.no_grad():
        assert_close(got, _fresh(second)(input_ids=ids).logits, changed_from=_fresh(first)(input_ids=ids).logits)


@pytest.mark.parametrize(
    ("variant", "error", "message"),
    [
        ({"r": 8, "alpha": 8}, AdapterStateError, "exceeds the loaded one's 4"),
        ({"r": 2, "alpha": 4, "targets": ["k_proj"]}, AdapterLoadError, "targets other layers"),
        ({"r": 2, "alpha": 4, "targets": ["q_proj", "v_proj", "k_proj"]}, AdapterLoadError, "the loaded one lacks"),
        ({"r": 2, "alpha": 4, "dora": True}, AdapterStateError, "use_dora"),
        ({"r": 2, "alpha": 4, "lora_dropout": 0.1}, AdapterStateError, "lora_dropout"),
    ],
)
def test_a_file_that_does_not_fit_is_refused_and_changes_nothing(
    saved: list[Path], tmp_path: Path, variant: dict[str, Any], error: type, message: str
) -> None:
    model = grafting.PeftModel.from_pretrained(tiny_llama(), saved[0])
    prepare_model_for_compiled_hotswap(model, target_rank=4)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    r, alpha = variant.pop("r"), variant.pop("alpha")
    folder = _save(tmp_path / "other", 9, r, alpha, **variant)
    with pytest.raises(error, match=message):
        hotswap_adapter(model, folder, "default")
    assert_identical(model.state_dict(), before)


def _base_weights(model: grafting.PeftModel) -> dict[str, torch.Tensor]:
    """The base layers' tensors (what a merge writes), cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "base_layer" in k}


@pytest.mark.parametrize("dora", [False, True])
def test_a_merged_adapter_is_refused_and_the_model_stays_bit_identical(tmp_path: Path, dora: bool) -> None:
    """Its values are in the base weights: a swap then an unmerge would subtract the new values (PEFT's ValueError)."""
    loaded = _save(tmp_path / "a", 1, 2, 4, dora=dora)
    other = _save(tmp_path / "b", 2, 2, 7, dora=dora)
    model = grafting.PeftModel.from_pretrained(tiny_llama(), loaded)
    model.merge_adapter()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        MergeError, match=r"hot-swap adapter 'default' because it is currently merged .*unmerge it first"
    ) as caught:
        hotswap_adapter(model, other, "default")
    assert isinstance(caught.value, ValueError)
    assert_identical(model.state_dict(), before)
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(4))
    model.unmerge_adapter()  # then the swap goes through
    hotswap_adapter(model, other, "default")
    with torch.no_grad():
        expected = _fresh(other)(input_ids=ids).logits
        assert_close(model(input_ids=ids).logits, expected, changed_from=_fresh(loaded)(input_ids=ids).logits)


@pytest.mark.parametrize("dora", [False, True])
def test_padding_a_merged_adapter_leaves_its_unmerge_exact(tmp_path: Path, dora: bool) -> None:
    """Not the swap's hazard: the zeros padding adds leave ``ΔW`` as it was, so the unmerge takes out what the merge
    put in and the base weights come back (prepare_model_for_compiled_hotswap accepts a merged adapter, as PEFT's)."""
    model = grafting.PeftModel.from_pretrained(tiny_llama(), _save(tmp_path / "a", 1, 2, 4, dora=dora))
    original = _base_weights(model)
    model.merge_adapter()
    merged = _base_weights(model)
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    assert_identical(_base_weights(model), merged)
    model.unmerge_adapter()
    assert_close(_base_weights(model), original, changed_from=merged)


def test_another_method_and_a_compiled_model_are_refused(saved: list[Path], tmp_path: Path) -> None:
    loha = grafting.get_peft_model(tiny_llama(), grafting.LoHaConfig(r=2, target_modules=ATTN))
    loha.save_pretrained(tmp_path / "loha")
    model = grafting.PeftModel.from_pretrained(tiny_llama(), saved[0])
    with pytest.raises(AdapterLoadError, match="hot-swapping keeps the method"):
        hotswap_adapter(model, tmp_path / "loha", "default")
    with pytest.raises(AdapterStateError, match=r"prepare it for hot-swapping before torch\.compile"):
        prepare_model_for_compiled_hotswap(torch.compile(model, backend="eager"), target_rank=4)
    prompt = grafting.get_peft_model(tiny_llama(), grafting.AdaptionPromptConfig(adapter_len=2, adapter_layers=1))
    with pytest.raises(AdapterStateError, match="does not support hot-swapping"):  # a method without the protocol's
        prepare_model_for_compiled_hotswap(prompt, target_rank=4)


def test_padding_keeps_the_outputs(saved: list[Path]) -> None:
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    model = grafting.PeftModel.from_pretrained(tiny_llama(), saved[0])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        prepare_model_for_compiled_hotswap(model, target_rank=16)
        after = model(input_ids=ids).logits
    layer = model.base_model.model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert layer.lora_A.weight.shape[0] == layer.lora_B.weight.shape[1] == 16
    assert_close(after, before)


def test_signatures_are_peft_s() -> None:
    from peft.utils import hotswap as theirs

    from tests.interop.test_peft_api import assert_peft_signature

    assert_peft_signature(theirs.hotswap_adapter, hotswap_adapter, "hotswap_adapter")
    assert_peft_signature(
        theirs.prepare_model_for_compiled_hotswap,
        prepare_model_for_compiled_hotswap,
        "prepare_model_for_compiled_hotswap",
    )
