"""``save_embedding_layers`` (True, False, "auto") saves the embedding layers PEFT saves, and both libraries load them.

"auto" saves them when ``target_modules`` names an embedding layer, or when the vocabulary was resized since
the base model (named by ``base_model_name_or_path``) was loaded; peft is the oracle for which keys a save holds.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import grafting
from grafting.errors import AdapterLoadError, ConfigError, GraftingWarning
from grafting.testing import assert_close, assert_identical, tiny_llama
from tests.helpers import ATTENTION, EMBEDDING, TASK_TYPES, base_model, peft_model

#: Target sets per architecture: attention only, with the input embedding, with the output head, a regex, all-linear.
TARGETS: dict[str, list[Any]] = {
    arch: [
        ATTENTION[arch],
        [*ATTENTION[arch], EMBEDDING[arch]],
        [*ATTENTION[arch], "lm_head"],
        rf".*({EMBEDDING[arch]}|lm_head|{ATTENTION[arch][0]})",
        "all-linear",
    ]
    for arch in ("llama", "gpt2", "bert", "t5")
}
CASES = [(arch, i) for arch, targets in TARGETS.items() for i in range(len(targets))]


def saved(lib: Any, model: Any, choice: bool | str) -> tuple[dict[str, torch.Tensor], int]:
    """The base-model tensors a save holds (adapter weights left out), and how many warnings spoke of it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tensors = lib.get_peft_model_state_dict(model, save_embedding_layers=choice)
    said = sum("save_embedding_layers" in str(w.message) for w in caught)
    return {k: v for k, v in tensors.items() if "lora_" not in k}, said


@pytest.mark.parametrize(("arch", "which"), CASES)
def test_saved_embedding_keys_are_peft_s(arch: str, which: int) -> None:
    import peft

    targets = TARGETS[arch][which]
    config = grafting.LoraConfig(r=2, target_modules=targets, task_type=TASK_TYPES[arch])
    ours_model = grafting.get_peft_model(base_model(arch), config)
    theirs_model = peft_model(arch, config)
    for choice in ("auto", True, False):
        ours, ours_said = saved(grafting, ours_model, choice)
        theirs, theirs_said = saved(peft, theirs_model, choice)
        assert sorted(ours) == sorted(theirs), (targets, choice)
        assert_identical(ours, theirs, msg=f"{targets} {choice}")  # the same base weights, copied
        assert (ours_said > 0) == (theirs_said > 0), (targets, choice, "warning")


TOKEN_CASES = [
    (["q_proj", "lm_head"], [1, 2]),
    (["q_proj"], [1, 2]),
    (["q_proj"], {"lm_head": [1, 2], "embed_tokens": [3]}),
]


@pytest.mark.parametrize(("targets", "tokens"), TOKEN_CASES)
def test_trainable_tokens_save_the_embedding_keys_peft_saves(targets: list[str], tokens: Any) -> None:
    """Rows trained as trainable tokens: "auto" adds no embedding layer; True saves them where PEFT's wrapper keeps them."""
    import peft

    config = grafting.LoraConfig(r=2, target_modules=targets, trainable_token_indices=tokens, task_type="CAUSAL_LM")
    ours_model = grafting.get_peft_model(base_model("llama"), config)
    theirs_model = peft_model("llama", config)
    for choice in ("auto", True, False):
        ours, ours_said = saved(grafting, ours_model, choice)
        theirs, theirs_said = saved(peft, theirs_model, choice)
        assert sorted(ours) == sorted(theirs), (targets, tokens, choice)
        assert any("token_adapter.trainable_tokens_delta" in k for k in ours)
        assert ours_said == theirs_said == 0


# -- a grown vocabulary comes back with the adapter ----------------------------------------------------
VOCAB, GROWN = 64, 72
PROBE = torch.tensor([[2, 65, 70, 9, 71, 12], [3, 64, 5, 66, 67, 68]])  # new tokens among old ones


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("base")
    tiny_llama(seed=0).save_pretrained(folder)
    return folder


def grown(folder: Path, seed: int) -> Any:
    """The base model loaded from ``folder`` (so it has a name), its vocabulary grown, new rows from ``seed``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    model.resize_token_embeddings(GROWN)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            emb.weight[VOCAB:] = torch.randn(GROWN - VOCAB, emb.weight.shape[1], generator=gen)
    return model


def logits(model: Any) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=PROBE).logits


LIBRARIES = [("grafting", "peft"), ("peft", "grafting")]
#: Why "auto" saves the embeddings: the config targets one, or the vocabulary was grown (nothing targets it).
REASONS: dict[str, dict[str, Any]] = {
    "targeted": {"target_modules": ["embed_tokens", "lm_head", "q_proj"]},
    "resized": {"target_modules": ["q_proj", "v_proj"]},
    # the grown rows trained as trainable tokens: the embedding goes where PEFT's trainable-tokens wrapper keeps it
    "new tokens": {"target_modules": ["q_proj"], "trainable_token_indices": [64, 65, 70, 71]},
}
WANTED = {
    "targeted": {"model.embed_tokens.base_layer.weight", "lm_head.base_layer.weight"},
    "resized": {"model.embed_tokens.weight", "lm_head.weight"},
    "new tokens": {"model.embed_tokens.token_adapter.base_layer.weight", "lm_head.weight"},
}


@pytest.mark.parametrize("reason", REASONS)
@pytest.mark.parametrize(("saver", "loader"), LIBRARIES)
def test_auto_saves_grown_embeddings_that_load_in_both_libraries(
    base_folder: Path, tmp_path: Path, reason: str, saver: str, loader: str
) -> None:
    import peft

    libs = {"grafting": grafting, "peft": peft}
    save_lib, load_lib = libs[saver], libs[loader]
    model = save_lib.get_peft_model(
        grown(base_folder, seed=0), save_lib.LoraConfig(r=2, init_lora_weights=False, **REASONS[reason])
    )
    expected = logits(model)
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        model.save_pretrained(tmp_path / "auto")
    model.save_pretrained(tmp_path / "without", save_embedding_layers=False)

    keys = set(load_file_keys(tmp_path / "auto")) - set(load_file_keys(tmp_path / "without"))
    assert keys == {f"base_model.model.{k}" for k in WANTED[reason]}

    def loaded(name: str) -> torch.Tensor:
        return logits(load_lib.PeftModel.from_pretrained(grown(base_folder, seed=1), str(tmp_path / name)))

    # the other base's new rows differ: only the saved embeddings bring the trained model back
    assert_close(loaded("auto"), expected, changed_from=loaded("without"))


def load_file_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as fh:
        return list(fh.keys())


def test_auto_without_a_readable_base_config_warns_and_leaves_embeddings_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hub id in offline mode: the base config cannot be read, the vocabulary is taken as unchanged (as peft)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = grafting.get_peft_model(tiny_llama(seed=0), grafting.LoraConfig(r=2, target_modules=["q_proj"]))
    model.peft_config["default"].base_model_name_or_path = "someone/tiny-llama"
    with pytest.warns(GraftingWarning, match="cannot read the config of the base model 'someone/tiny-llama'"):
        tensors = grafting.get_peft_model_state_dict(model)
    assert all("lora_" in k for k in tensors)


def test_a_model_without_embeddings_warns_when_asked_to_save_them() -> None:
    base = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    model = grafting.get_peft_model(base, grafting.LoraConfig(r=2, target_modules=["0"]))
    with pytest.warns(GraftingWarning, match="no get_input_embeddings"):
        tensors = grafting.get_peft_model_state_dict(model, save_embedding_layers=True)
    assert all("lora_" in k for k in tensors)


@pytest.mark.parametrize("choice", ["yes", "Auto", None, 1])
def test_save_embedding_layers_takes_true_false_or_auto(choice: Any) -> None:
    model = grafting.get_peft_model(tiny_llama(seed=0), grafting.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="save_embedding_layers must be True, False or 'auto'"):
        grafting.get_peft_model_state_dict(model, save_embedding_layers=choice)


def test_peft_s_second_copy_of_tied_token_rows_is_refused_unless_not_strict(tmp_path: Path) -> None:
    """GPT-2 ties its head to the embedding: with True, PEFT also writes the rows under the head (README's differences)."""
    from tests.helpers import logits as arch_logits

    config = grafting.LoraConfig(
        r=2, target_modules=["c_attn"], trainable_token_indices=[1, 2], init_lora_weights=False, task_type="CAUSAL_LM"
    )
    theirs = peft_model("gpt2", config)
    theirs.save_pretrained(tmp_path, save_embedding_layers=True)
    assert "base_model.model.lm_head.token_adapter.trainable_tokens_delta" in load_file_keys(tmp_path)
    with pytest.raises(AdapterLoadError, match=r"lm_head\.token_adapter\.trainable_tokens_delta"):
        grafting.PeftModel.from_pretrained(base_model("gpt2"), tmp_path)
    ours = grafting.PeftModel.from_pretrained(base_model("gpt2"), tmp_path, strict=False)
    assert_close(
        arch_logits(ours, "gpt2"), arch_logits(theirs, "gpt2"), changed_from=arch_logits(base_model("gpt2"), "gpt2")
    )
