"""Interoperability with PEFT (the oracle): adapters saved by either library load in the other, same logits."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lora_model_helpers import (
    ARCHS,
    EMBEDDING,
    adapted,
    base_logits,
    base_model,
    logits,
    lora,
    lora_configs,
    loss_inputs,
    peft_model,
    randomize,
    randomize_named,
)
from safetensors.torch import load_file

import grafting
from grafting.io.state_dict import get_peft_model_state_dict
from grafting.testing import assert_close, assert_identical, tolerance

EXAMPLES = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
WEIGHTS = "adapter_model.safetensors"


def _peft_load(arch: str, folder: Path, **kwargs: Any) -> tuple[Any, list[str]]:
    """PEFT's PeftModel.from_pretrained, with the warnings it gave."""
    import peft

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base_model(arch), str(folder), **kwargs)
    return model, [str(w.message) for w in caught]


def _complaints(messages: list[str]) -> list[str]:
    """Warnings that would mean the file does not fit PEFT: unknown config keys, missing or unexpected tensors."""
    words = ("unexpected keyword", "missing", "unexpected key", "were not used", "not found")
    return [m for m in messages if any(w in m.lower() for w in words)]


def _peft_tensors(model: Any, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict as peft_state_dict

    return {k: v.clone() for k, v in peft_state_dict(model, adapter_name=adapter_name).items()}


def _randomize_peft(model: Any, seed: int) -> None:
    randomize_named(model, "lora_", seed)
    randomize_named(model, "modules_to_save", seed + 1)


# -- grafting -> PEFT ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@EXAMPLES
@given(data=st.data())
def test_grafting_adapters_load_into_peft(arch: str, data: st.DataObject, tmp_path_factory: Any) -> None:
    config = data.draw(lora_configs(arch))
    model = adapted(arch, config)
    randomize(model, 7)
    out = logits(model, arch)
    folder = tmp_path_factory.mktemp("grafting")
    model.save_pretrained(folder)

    theirs, messages = _peft_load(arch, folder)
    assert not _complaints(messages), _complaints(messages)
    assert_close(logits(theirs, arch), out, changed_from=base_logits(arch), msg="PEFT's logits for grafting's adapter")
    ours = load_file(folder / WEIGHTS)
    peft_state = _peft_tensors(theirs)
    assert_identical({k: peft_state[k] for k in ours}, ours, "PEFT's adapter tensors")


# -- PEFT -> grafting -------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@EXAMPLES
@given(data=st.data())
def test_peft_adapters_load_into_grafting(arch: str, data: st.DataObject, tmp_path_factory: Any) -> None:
    config = data.draw(lora_configs(arch))
    # PEFT sorts pattern keys when it saves, so with two keys its file may not fit its own tensors
    first = {name: dict(list(getattr(config, name).items())[:1]) for name in ("rank_pattern", "alpha_pattern")}
    config = attrs.evolve(config, **first)
    theirs = peft_model(arch, config)
    _randomize_peft(theirs, 11)
    theirs.eval()
    out = logits(theirs, arch)
    folder = tmp_path_factory.mktemp("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(folder)

    with warnings.catch_warnings():
        warnings.simplefilter("error", grafting.GraftingWarning)  # every key of PEFT's config is known
        warnings.simplefilter("ignore", grafting.UnusedOptionWarning)  # a pattern key PEFT also warns about
        warnings.simplefilter("ignore", grafting.TiedWeightsWarning)  # a tied embedding adapted: PEFT warns too
        ours = grafting.PeftModel.from_pretrained(base_model(arch), folder)
    assert_close(logits(ours, arch), out, changed_from=base_logits(arch), msg="grafting's logits for PEFT's adapter")
    saved = load_file(folder / WEIGHTS)
    mine = get_peft_model_state_dict(ours)
    assert_identical({k: saved[k] for k in mine}, mine, "grafting's adapter tensors")


# -- training ---------------------------------------------------------------------------------------------
def _normalized(name: str) -> str:
    """A grafting parameter name as PEFT names it, adapter name dropped on both sides."""
    name = name.replace(".adapters.default.", ".").replace(".modules_to_save.default.", ".modules_to_save.")
    return name.replace("lora_magnitude_vector", "lora_magnitude_vector.weight")


@pytest.mark.parametrize("arch", ARCHS)
@EXAMPLES
@given(data=st.data())
def test_same_loss_and_gradients_as_peft(arch: str, data: st.DataObject, tmp_path_factory: Any) -> None:
    """The same adapter in both libraries gives the same loss and gradients, up to rounding (no dropout)."""
    model = adapted(arch, data.draw(lora_configs(arch)))
    randomize(model, 5)
    folder = tmp_path_factory.mktemp("train")
    model.save_pretrained(folder)
    theirs, _ = _peft_load(arch, folder, is_trainable=True)
    batch = loss_inputs(arch)
    ours_out, their_out = model(**batch), theirs(**batch)
    with torch.no_grad():
        base_out = base_model(arch)(**batch).logits
    assert_close(ours_out.logits, their_out.logits, changed_from=base_out, msg="logits")
    ours_loss, their_loss = ours_out.loss, their_out.loss
    assert_close(ours_loss, their_loss, msg="loss")
    ours_loss.backward()
    their_loss.backward()
    ours = {_normalized(n): p.grad for n, p in model.named_parameters() if p.requires_grad}
    peft_grads = {n.replace(".default", ""): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert sorted(ours) == sorted(peft_grads)
    for name, grad in ours.items():
        # a factor's gradient sums over every token and through both layers, added in each library's own order
        # (and BLAS's, which may block a float32 product differently from one call to the next): four times
        # the dtype's slack at the gradient's scale; a wrong gradient misses by orders of magnitude more
        rtol, atol = tolerance(peft_grads[name])
        assert_close(grad, peft_grads[name], rtol=rtol, atol=4 * atol, msg=f"gradient of {name}")


# -- specific features, both ways ---------------------------------------------------------------------------
FEATURES: list[tuple[str, dict[str, Any]]] = [
    ("bert", {"target_modules": ["query", "value"], "modules_to_save": ["pooler"]}),  # + classifier (SEQ_CLS)
    ("bert", {"target_modules": ["word_embeddings", "key"], "r": 3}),
    ("bert", {"target_modules": ["query"], "bias": "all"}),  # PEFT's file repeats the head's bias
    ("bert", {"target_modules": ["value"], "bias": "lora_only", "use_dora": True}),
    ("gpt2", {"target_modules": ["c_attn", "c_fc"], "use_dora": True, "fan_in_fan_out": True}),
    ("gpt2", {"target_modules": ["wte", "c_proj"]}),
    ("llama", {"target_modules": ["embed_tokens", "q_proj"], "lora_alpha": 3}),
    ("llama", {"target_modules": "all-linear", "rank_pattern": {"q_proj": 2, "down_proj": 5}, "use_rslora": True}),
    ("llama", {"target_modules": ["q_proj", "v_proj"], "alpha_pattern": {r"layers\.1\.self_attn\.v_proj": 30}}),
    ("t5", {"target_modules": ["q", "v", "wo"], "use_dora": True, "r": 2}),
    ("t5", {"target_modules": ["embed_tokens", "k"]}),
    ("t5", {"target_modules": ["q"], "layers_to_transform": [1], "layers_pattern": "block"}),
]


@pytest.mark.parametrize(("arch", "kwargs"), FEATURES)
def test_feature_round_trips_both_ways(arch: str, kwargs: dict[str, Any], tmp_path: Path) -> None:
    config = lora(arch, **kwargs)
    model = adapted(arch, config)
    randomize(model, 3)
    model.save_pretrained(tmp_path / "ours")
    theirs, messages = _peft_load(arch, tmp_path / "ours")
    assert not _complaints(messages), _complaints(messages)
    assert_close(logits(theirs, arch), logits(model, arch), changed_from=base_logits(arch), msg="grafting -> PEFT")

    _randomize_peft(theirs, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "theirs")
    back = grafting.PeftModel.from_pretrained(base_model(arch), tmp_path / "theirs")
    assert_close(logits(back, arch), logits(theirs, arch), changed_from=base_logits(arch), msg="PEFT -> grafting")


def test_named_adapters_and_subfolders_both_ways(tmp_path: Path) -> None:
    import peft

    arch = "llama"
    ours = adapted(arch, lora(arch, r=2))
    ours.add_adapter("second", lora(arch, r=4, target_modules=["k_proj", "up_proj"]))
    randomize(ours, 2)
    outputs = {}
    for name in ("default", "second"):
        ours.set_adapter(name)
        outputs[name] = logits(ours, arch)
    ours.save_pretrained(tmp_path / "ours")

    theirs, messages = _peft_load(arch, tmp_path / "ours")
    assert not _complaints(messages)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.load_adapter(str(tmp_path / "ours" / "second"), adapter_name="second")
    for name, out in outputs.items():
        theirs.set_adapter(name)
        assert_close(logits(theirs, arch), out, changed_from=base_logits(arch), msg=f"PEFT with grafting's {name!r}")

    # PEFT saves several adapters and a selection; grafting reads them from the same places
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(str(tmp_path / "theirs"))
        theirs.save_pretrained(str(tmp_path / "selected"), selected_adapters=["second"])
    assert (tmp_path / "theirs" / "second" / WEIGHTS).is_file()
    back = grafting.PeftModel.from_pretrained(base_model(arch), tmp_path / "theirs")
    back.load_adapter(tmp_path / "theirs", "second", subfolder="second")
    for name, out in outputs.items():
        back.set_adapter(name)
        assert_close(logits(back, arch), out, changed_from=base_logits(arch), msg=f"grafting with PEFT's {name!r}")
    selected = grafting.PeftModel.from_pretrained(
        base_model(arch), tmp_path / "selected", subfolder="second", adapter_name="second"
    )
    assert_close(
        logits(selected, arch), outputs["second"], changed_from=outputs["default"], msg="PEFT's selected adapter"
    )
    assert isinstance(theirs, peft.PeftModel)


# -- trainable parameter counts -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@given(data=st.data())
def test_trainable_parameters_as_peft_counts_them(arch: str, data: st.DataObject) -> None:
    config = data.draw(lora_configs(arch))
    ours = adapted(arch, config)
    theirs = peft_model(arch, config)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_print_trainable_parameters_as_peft(capsys: pytest.CaptureFixture[str]) -> None:
    for arch in ARCHS:
        config = lora(arch, target_modules="all-linear", use_dora=True)
        peft_model(arch, config).print_trainable_parameters()
        expected = capsys.readouterr().out
        adapted(arch, config).print_trainable_parameters()
        assert capsys.readouterr().out == expected
        assert expected.startswith("trainable params: ")


def test_embedding_names_cover_every_architecture() -> None:
    for arch in ARCHS:
        model = base_model(arch)
        assert any(n.endswith("." + EMBEDDING[arch]) or n == EMBEDDING[arch] for n, _ in model.named_modules())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_saved_embedding_layers_are_named_and_loaded_as_in_peft(arch: str, tmp_path: Path) -> None:
    model = adapted(arch, lora(arch, target_modules=[EMBEDDING[arch], "c_attn" if arch == "gpt2" else "q_proj"]))
    randomize(model, 2)
    model.save_pretrained(tmp_path, save_embedding_layers=True)
    keys = set(load_file(tmp_path / WEIGHTS))
    embedding = {"llama": "model.embed_tokens", "gpt2": "transformer.wte"}[arch]
    head = f"base_model.model.{embedding}.base_layer.weight"
    assert head in keys
    # as PEFT: with embed_tokens in target_modules only the adapted embedding is saved; GPT-2's wte is not a
    # name PEFT takes for an embedding, so both embedding layers are
    assert ("base_model.model.lm_head.weight" in keys) == (arch == "gpt2")
    back = grafting.PeftModel.from_pretrained(base_model(arch), tmp_path)
    assert_close(
        logits(back, arch),
        logits(model, arch),
        changed_from=base_logits(arch),
        msg="grafting with the embedding weights",
    )
    theirs, messages = _peft_load(arch, tmp_path)
    assert not _complaints(messages), _complaints(messages)
    assert_close(
        logits(theirs, arch), logits(model, arch), changed_from=base_logits(arch), msg="PEFT with the embedding weights"
    )
