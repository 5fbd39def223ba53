"""add_weighted_adapter: LoRA's combination types and IA3's against PEFT, DARE's semantics, and refusals."""

from __future__ import annotations

import inspect
import itertools
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import grafting
from grafting.errors import CombinationError
from grafting.model.weights import to_weight_layout
from grafting.testing import assert_close
from tests.helpers import EMBEDDING, adapted, base_model, logits, lora, randomize, state_of

#: Per architecture: targets with an embedding (LoRA on embeddings combines too); GPT-2 has Conv1D layers.
TARGETS = {
    "llama": ["q_proj", "v_proj", EMBEDDING["llama"]],
    "gpt2": ["c_attn", "c_proj"],
    "bert": ["query", "value"],
}
DETERMINISTIC = ("svd", "linear", "cat", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd")
PRUNING = ("ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd", "dare_linear", "dare_ties")
SAME_RANK = ("linear", "ties", "magnitude_prune", "dare_linear", "dare_ties")
_names = (f"new{i}" for i in itertools.count())


class Pair:
    """The same two LoRA adapters, ``a`` and ``b``, in a grafting model and a PEFT model."""

    def __init__(self, arch: str, folder: Path, ranks: tuple[int, int] = (4, 4), **options: Any) -> None:
        import peft

        self.arch = arch
        # no task type: BERT's classifier copies (modules_to_save) could not be combined
        first = lora(arch, r=ranks[0], lora_alpha=6, target_modules=TARGETS[arch], task_type=None)
        self.ours = adapted(arch, first, "a")
        second = lora(arch, r=ranks[1], lora_alpha=3, target_modules=TARGETS[arch], task_type=None, **options)
        self.ours.add_adapter("b", second)
        randomize(self.ours, 1)
        self.ours.save_pretrained(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.theirs = peft.PeftModel.from_pretrained(base_model(arch), str(folder / "a"), adapter_name="a")
            self.theirs.load_adapter(str(folder / "b"), adapter_name="b")

    def combine(self, *args: Any, **kwargs: Any) -> str:
        name = next(_names)
        self.ours.add_weighted_adapter(*args, adapter_name=name, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.theirs.add_weighted_adapter(*args, adapter_name=name, **kwargs)
        return name

    def deltas(self, name: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(layer, our ΔW, PEFT's ΔW) in the base weight's layout, for every layer the new adapter is on."""
        theirs = dict(self.theirs.base_model.model.named_modules())
        out = []
        for path, layer in self.ours.base_model.adapted_layers():
            if name in layer.adapters:
                ours = to_weight_layout(layer.base_layer, layer.adapters[name].delta_matrix().detach())
                out.append((path, ours, theirs[path].get_delta_weight(name).detach()))
        return out


@pytest.fixture(scope="module", params=sorted(TARGETS))
def pair(request: Any, tmp_path_factory: Any) -> Pair:
    return Pair(request.param, tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def ranked_pair(tmp_path_factory: Any) -> Pair:
    """Different ranks, and a rank_pattern on one adapter."""
    return Pair("llama", tmp_path_factory.mktemp("ranked"), ranks=(4, 2), rank_pattern={"v_proj": 3})


def test_signature_is_peft_s() -> None:
    from peft import LoraModel

    ours = inspect.signature(grafting.PeftModel(base_model("llama"), lora("llama")).add_weighted_adapter)
    theirs = inspect.signature(LoraModel.add_weighted_adapter)
    assert list(ours.parameters) == [p for p in theirs.parameters if p != "self"]
    for name, param in ours.parameters.items():
        assert param.default == theirs.parameters[name].default, name


@pytest.mark.parametrize("kind", DETERMINISTIC)
def test_deterministic_combinations_equal_peft_s(pair: Pair, kind: str) -> None:
    density = 0.5 if kind in PRUNING else None
    name = pair.combine(["a", "b"], [0.7, -0.4], combination_type=kind, density=density)
    deltas = pair.deltas(name)
    assert {path.rsplit(".", 1)[-1] for path, _, _ in deltas} == set(TARGETS[pair.arch])
    for path, ours, theirs in deltas:
        assert_close(ours, theirs, changed_from=torch.zeros_like(theirs), msg=f"{kind} at {path}")
    pair.ours.set_adapter(name)
    pair.theirs.set_adapter(name)
    base = logits(base_model(pair.arch), pair.arch)
    assert_close(logits(pair.ours, pair.arch), logits(pair.theirs, pair.arch), changed_from=base)
    pair.ours.set_adapter("a")
    pair.theirs.set_adapter("a")


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("cat", {}),
        ("svd", {}),
        ("svd", {"svd_rank": 3, "svd_clamp": 0.95}),
        ("svd", {"svd_rank": 5, "svd_full_matrices": False}),
        ("ties_svd", {"density": 0.3, "majority_sign_method": "frequency"}),
    ],
)
def test_different_ranks_equal_peft_s(ranked_pair: Pair, kind: str, options: dict[str, Any]) -> None:
    name = ranked_pair.combine(["a", "b"], [1.5, 0.5], combination_type=kind, **options)
    expected_rank = {"cat": 4 + 3}.get(kind, options.get("svd_rank", 4))
    for path, ours, theirs in ranked_pair.deltas(name):
        layer = ranked_pair.ours.base_model.model.get_submodule(path)
        assert layer.adapters[name].r == expected_rank
        assert_close(ours, theirs, changed_from=torch.zeros_like(theirs), msg=f"{kind} at {path}")
    config = ranked_pair.ours.peft_config[name]
    assert (config.r, config.lora_alpha, config.rank_pattern) == (expected_rank, expected_rank, {})


def test_cat_is_the_exact_weighted_sum(ranked_pair: Pair) -> None:
    name = ranked_pair.combine(["a", "b"], [0.25, -2.0], combination_type="cat")
    for _, layer in ranked_pair.ours.base_model.adapted_layers():
        expected = 0.25 * layer.adapters["a"].delta_matrix() - 2.0 * layer.adapters["b"].delta_matrix()
        torch.testing.assert_close(layer.adapters[name].delta_matrix(), expected)


def test_one_adapter_is_scaled_linearly(ranked_pair: Pair) -> None:
    name = ranked_pair.combine(["b"], [3.0], combination_type="svd", svd_rank=1)  # PEFT: linear for one adapter
    for _, layer in ranked_pair.ours.base_model.adapted_layers():
        torch.testing.assert_close(layer.adapters[name].delta_matrix(), 3.0 * layer.adapters["b"].delta_matrix())


# -- DARE: random, so its definition is checked, not PEFT's bits ----------------------------------------------------
def _factors(model: Any, name: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(new A, source a's A scaled, source b's A scaled) per linear layer, for dare_linear's A side."""
    out = []
    for _, layer in model.base_model.adapted_layers():
        new, a, b = (layer.adapters[n] for n in (name, "a", "b"))
        if hasattr(new, "lora_A"):
            out.append((new.lora_A.weight.detach(), a.lora_A.weight.detach(), b.lora_A.weight.detach()))
    return out


def test_dare_linear_keeps_each_entry_at_random_and_rescales(tmp_path: Path) -> None:
    pair = Pair("llama", tmp_path)
    model, density, weights = pair.ours, 0.4, [0.7, 0.5]
    torch.manual_seed(0)
    name = next(_names)
    model.add_weighted_adapter(["a", "b"], weights, name, combination_type="dare_linear", density=density)
    layers = model.base_model.adapted_layers()
    scaling = {n: next(layer for _, layer in layers).adapters[n].scaling for n in ("a", "b")}
    ca, cb = (weights[i] * scaling[n] for i, n in enumerate(("a", "b")))
    kept_a = kept_b = total = 0
    for new, a, b in _factors(model, name):
        # each entry is (√ca·a·m₁ + √cb·b·m₂)/density for masks m₁, m₂ in {0, 1}: find them
        options = torch.stack([(ca**0.5 * a * m1 + cb**0.5 * b * m2) / density for m1 in (0, 1) for m2 in (0, 1)])
        error = (options - new).abs()
        best = error.argmin(dim=0)
        assert error.min(dim=0).values.max() < 1e-5, "an entry is no combination of kept and dropped entries"
        kept_a += int((best >= 2).sum())
        kept_b += int((best % 2 == 1).sum())
        total += new.numel()
    for kept in (kept_a, kept_b):  # binomial(total, density): 5 standard deviations
        assert abs(kept / total - density) < 5 * (density * (1 - density) / total) ** 0.5
    torch.manual_seed(0)
    again = next(_names)
    model.add_weighted_adapter(["a", "b"], weights, again, combination_type="dare_linear", density=density)
    for (x, _, _), (y, _, _) in zip(_factors(model, name), _factors(model, again), strict=True):
        assert torch.equal(x, y), "the same seed gives the same adapter"


@pytest.mark.parametrize(
    ("dare", "plain"), [("dare_ties", "ties"), ("dare_linear_svd", "svd"), ("dare_ties_svd", "ties_svd")]
)
def test_dare_with_nothing_dropped_is_its_deterministic_counterpart(ranked_pair: Pair, dare: str, plain: str) -> None:
    model = ranked_pair.ours
    if dare == "dare_ties":  # one rank is needed for the factor-wise types
        model = adapted("bert", lora("bert", r=2, task_type=None), "a")
        model.add_adapter("b", lora("bert", r=2, task_type=None))
        randomize(model, 4)
    first, second = next(_names), next(_names)
    model.add_weighted_adapter(["a", "b"], [0.6, -0.9], first, combination_type=dare, density=1.0)
    model.add_weighted_adapter(["a", "b"], [0.6, -0.9], second, combination_type=plain, density=1.0)
    dropped, third = next(_names), next(_names)
    model.add_weighted_adapter(["a", "b"], [0.6, -0.9], dropped, combination_type=dare, density=0.5)
    model.add_weighted_adapter(["a", "b"], [0.6, -0.9], third, combination_type=plain, density=0.5)
    for _, layer in model.base_model.adapted_layers():
        torch.testing.assert_close(layer.adapters[first].delta_matrix(), layer.adapters[second].delta_matrix())
        assert not torch.allclose(layer.adapters[dropped].delta_matrix(), layer.adapters[third].delta_matrix())


# -- the new adapter in the model --------------------------------------------------------------------------------
def test_new_adapter_is_inactive_frozen_saved_and_reloaded(ranked_pair: Pair, tmp_path: Path) -> None:
    model = ranked_pair.ours
    name = ranked_pair.combine(["a", "b"], [1.0, 1.0], combination_type="cat")
    assert model.active_adapters == ["a"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if f".{name}." in n)
    model.set_adapter(name)
    out = logits(model, "llama")
    model.save_pretrained(tmp_path, selected_adapters=[name])
    loaded = grafting.PeftModel.from_pretrained(base_model("llama"), tmp_path / name)
    torch.testing.assert_close(logits(loaded, "llama"), out)
    model.set_adapter("a")


def test_modules_to_save_copy_comes_from_the_one_source_that_trains_it() -> None:
    model = adapted("bert", lora("bert", task_type=None, modules_to_save=["classifier"]), "a")
    model.add_adapter("b", lora("bert", task_type=None))
    randomize(model, 2)
    model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "ab", combination_type="linear")
    wrapper = model.base_model.model.classifier
    assert_same = torch.testing.assert_close
    assert_same(state_of(wrapper.modules_to_save["ab"]), state_of(wrapper.modules_to_save["a"]))


def test_ia3_vectors_combine_as_peft_s(tmp_path: Path) -> None:
    import peft

    config = grafting.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    ours = adapted("llama", config, "a")
    ours.add_adapter("b", grafting.IA3Config(target_modules=["v_proj"], feedforward_modules=[]))
    randomize(ours, 5)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(base_model("llama"), str(tmp_path / "a"), adapter_name="a")
        theirs.load_adapter(str(tmp_path / "b"), adapter_name="b")
    ours.add_weighted_adapter(["a", "b"], [0.3, 1.7], "ab")
    theirs.add_weighted_adapter(["a", "b"], [0.3, 1.7], "ab")
    assert sorted(ours.peft_config["ab"].target_modules) == sorted(theirs.peft_config["ab"].target_modules)
    ours.set_adapter("ab")
    theirs.set_adapter("ab")
    assert_close(logits(ours, "llama"), logits(theirs, "llama"), changed_from=logits(base_model("llama"), "llama"))


# -- refusals: one clear error, the model unchanged ------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        ((["a", "zz"], [1, 1]), {}, grafting.AdapterNotFoundError, "zz"),
        ((["a", "b"], [1]), {}, CombinationError, "one number per adapter"),
        ((["a", "b"], [1, 1]), {"combination_type": "average"}, CombinationError, "not one of LoRA's"),
        ((["a", "b"], [1, 1]), {"combination_type": "linear"}, CombinationError, "need one rank"),
        ((["a", "b"], [1, 1]), {"combination_type": "ties_svd"}, CombinationError, "give density"),
        ((["a", "b"], [1, 1]), {"combination_type": "ties_svd", "density": 2.0}, ValueError, r"\[0, 1\]"),
        ((["a", "a"], [1, 1]), {}, CombinationError, "twice"),
    ],
)
def test_bad_requests_raise_and_leave_the_model_unchanged(
    ranked_pair: Pair, args: tuple, kwargs: dict[str, Any], error: type, message: str
) -> None:
    model = ranked_pair.ours
    before, names = state_of(model), sorted(model.peft_config)
    with pytest.raises(error, match=message):
        model.add_weighted_adapter(*args, "refused", **kwargs)
    assert sorted(model.peft_config) == names
    assert sorted(state_of(model)) == sorted(before)


def test_existing_name_warns_and_changes_nothing(ranked_pair: Pair) -> None:
    before = state_of(ranked_pair.ours)
    with pytest.warns(grafting.GraftingWarning, match="already holds"):
        ranked_pair.ours.add_weighted_adapter(["a", "b"], [1, 1], "b", combination_type="cat")
    assert all(torch.equal(v, before[k]) for k, v in state_of(ranked_pair.ours).items())


def test_dora_and_methods_without_a_combination_are_refused() -> None:
    model = adapted("llama", lora("llama", use_dora=True), "a")
    model.add_adapter("b", lora("llama"))
    with pytest.raises(CombinationError, match="DoRA"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "c")
    loha = grafting.get_peft_model(base_model("llama"), grafting.LoHaConfig(target_modules=["q_proj"]), "a")
    loha.add_adapter("b", grafting.LoHaConfig(target_modules=["q_proj"]))
    with pytest.raises(CombinationError, match="no installed plugin combines"):  # PEFT has none for LoHa either
        loha.add_weighted_adapter(["a", "b"], [1, 1], "c")
    assert sorted(loha.peft_config) == ["a", "b"]


def test_rslora_sources_combine_exactly() -> None:
    """PEFT keeps use_rslora on the new adapter, whose scaling r/√r then multiplies the combined delta by √r;
    grafting's new adapter has scaling 1 and carries exactly the combination."""
    model = adapted("llama", lora("llama", r=4, use_rslora=True), "a")
    model.add_adapter("b", lora("llama", r=2, use_rslora=True, lora_alpha=5))
    randomize(model, 6)
    model.add_weighted_adapter(["a", "b"], [0.5, 2.0], "ab", combination_type="cat")
    assert model.peft_config["ab"].use_rslora is False
    for _, layer in model.base_model.adapted_layers():
        expected = 0.5 * layer.adapters["a"].delta_matrix() + 2.0 * layer.adapters["b"].delta_matrix()
        torch.testing.assert_close(layer.adapters["ab"].delta_matrix(), expected)


def test_lora_and_loha_combine_into_one_lora_adapter() -> None:
    """Across methods (a grafting extra): an SVD type of full rank reproduces the mix exactly."""
    model = grafting.get_peft_model(
        base_model("llama"), lora("llama", target_modules=["q_proj", "v_proj"]), "a", mixed=True
    )
    model.add_adapter("b", grafting.LoHaConfig(r=2, alpha=3, target_modules=["q_proj", "k_proj"], init_weights=False))
    randomize(model, 8)
    model.set_adapter(["a", "b"])
    mixed = logits(model, "llama")
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ab", combination_type="svd", svd_rank=16)  # full rank
    assert type(model.peft_config["ab"]).__name__ == "LoraConfig"
    for path, layer in model.base_model.adapted_layers():
        parts = [layer.adapters[n].delta_matrix() for n in ("a", "b") if n in layer.adapters]
        assert_close(layer.adapters["ab"].delta_matrix(), sum(parts), msg=path)
    model.set_adapter("ab")
    assert_close(logits(model, "llama"), mixed, changed_from=logits(base_model("llama"), "llama"))
    with pytest.raises(CombinationError, match="SVD type"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "cat", combination_type="cat")
    model.add_adapter("c", grafting.IA3Config(target_modules=["v_proj"], feedforward_modules=[]))
    with pytest.raises(CombinationError, match="no fixed ΔW"):
        model.add_weighted_adapter(["a", "c"], [1.0, 1.0], "ac")
    assert "ac" not in model.peft_config
