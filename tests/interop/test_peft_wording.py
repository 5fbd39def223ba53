"""grafting's errors and warnings contain PEFT's sentence where PEFT raises or warns: user code matches it.

Each case triggers the same situation in PEFT (the oracle) and in grafting and checks that PEFT's
message is part of grafting's (which may say more) and that the error's class is one PEFT's
``except`` clauses catch.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import peft
import pytest

import grafting
from tests.helpers import base_model


def warned(action: Callable[[], Any]) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return [str(w.message) for w in caught if not issubclass(w.category, FutureWarning)]


def lora(library: Any, **options: Any) -> Any:
    options.setdefault("target_modules", ["q_proj"])
    return library.get_peft_model(base_model("llama"), library.LoraConfig(r=2, **options))


def merged_twice(library: Any) -> list[str]:
    model = lora(library)
    model.merge_adapter()
    return warned(model.merge_adapter)


def embeddings_saved(library: Any) -> list[str]:
    model = lora(library, target_modules=["q_proj", "embed_tokens"])
    with tempfile.TemporaryDirectory() as folder:
        return warned(lambda: model.save_pretrained(folder))


def bias_without_base_bias(library: Any) -> list[str]:
    return warned(lambda: lora(library, lora_bias=True))


def mlp_encoder_depth(library: Any) -> list[str]:
    def build() -> None:
        config = library.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, encoder_num_layers=3)
        library.get_peft_model(base_model("llama"), config)

    return warned(build)


WARNINGS = {
    "merge_adapter twice": merged_twice,
    "save_embedding_layers auto": embeddings_saved,
    "lora_bias on a layer without a bias": bias_without_base_bias,
    "P-tuning MLP depth": mlp_encoder_depth,
}


@pytest.mark.parametrize("case", list(WARNINGS))
def test_warnings_contain_peft_s_sentence(case: str) -> None:
    theirs = WARNINGS[case](peft)
    ours = WARNINGS[case](grafting)
    assert theirs
    for message in theirs:
        assert any(message in mine for mine in ours), (message, ours)


@pytest.mark.parametrize("call", ["set_adapter", "delete_adapter"])
def test_an_unknown_adapter_error_contains_peft_s_sentence(call: str) -> None:
    with pytest.raises(ValueError, match="Adapter nope"):
        getattr(lora(peft), call)("nope")
    with pytest.raises(grafting.AdapterNotFoundError) as ours:  # a ValueError, as PEFT's
        getattr(lora(grafting), call)("nope")
    assert isinstance(ours.value, ValueError)
    assert "Adapter nope not found." in str(ours.value)


@pytest.mark.parametrize("operation", ["unload", "merge_and_unload"])
def test_unloading_a_prompt_learning_model_is_an_attribute_error_as_in_peft(operation: str) -> None:
    config = {"task_type": "CAUSAL_LM", "num_virtual_tokens": 2}
    theirs = peft.get_peft_model(base_model("llama"), peft.PromptTuningConfig(**config))
    ours = grafting.get_peft_model(base_model("llama"), grafting.PromptTuningConfig(**config))
    with pytest.raises(AttributeError) as peft_error:
        getattr(theirs, operation)()
    with pytest.raises(grafting.NotAvailableError) as error:
        getattr(ours, operation)()
    assert isinstance(error.value, AttributeError)
    assert str(peft_error.value) in str(error.value)
    assert ours.get_base_model().model.embed_tokens is not None  # the model is left as it was


def test_seq2seq_generate_takes_keywords_only_as_in_peft() -> None:
    import torch

    config = {"task_type": "SEQ_2_SEQ_LM", "target_modules": ["q", "v"], "r": 2}
    theirs = peft.get_peft_model(base_model("t5"), peft.LoraConfig(**config))
    ours = grafting.get_peft_model(base_model("t5"), grafting.LoraConfig(**config))
    ids = torch.tensor([[4, 5, 6]])
    with pytest.raises(TypeError):
        theirs.generate(ids, max_new_tokens=2)
    with pytest.raises(TypeError):
        ours.generate(ids, max_new_tokens=2)
    assert (
        ours.generate(input_ids=ids, max_new_tokens=2).shape == theirs.generate(input_ids=ids, max_new_tokens=2).shape
    )


def test_two_active_adapters_with_one_modules_to_save_module_are_a_value_error_as_in_peft() -> None:
    def two(library: Any) -> Any:
        model = library.get_peft_model(
            base_model("llama"), library.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
        )
        model.add_adapter("b", library.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
        return model

    with pytest.raises(ValueError, match="Only one adapter can be set at a time for ModulesToSaveWrapper"):
        two(peft).base_model.set_adapter(["default", "b"])
    ours = two(grafting)
    with pytest.raises(grafting.ActiveAdaptersError, match="Only one adapter can be set at a time for ModulesToSav"):
        ours.base_model.set_adapter(["default", "b"])
    assert ours.active_adapters == ["default"]  # nothing changed


def test_hot_swapping_a_merged_adapter_is_a_value_error_with_peft_s_sentence(tmp_path: Any) -> None:
    """Both refuse to hot-swap an adapter merged into the base weights; grafting's message starts as PEFT's."""
    from peft.utils.hotswap import hotswap_adapter as peft_hotswap

    saved = tmp_path / "saved"
    lora(peft).save_pretrained(saved)
    sentence = "Cannot hot-swap adapter 'default' because it is currently merged into the base weights."
    for library, swap in ((peft, peft_hotswap), (grafting, grafting.hotswap_adapter)):
        model = library.PeftModel.from_pretrained(base_model("llama"), saved)
        model.merge_adapter()
        with pytest.raises(ValueError, match=re.escape(sentence)):
            swap(model, str(saved), "default")
