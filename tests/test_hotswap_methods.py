"""Hot-swap for every layer method (the protocol's ``pad_rank``/``hotswap_values``): an adapter swapped into a model
holding another of the same method computes what a freshly loaded one does, eagerly and compiled
(``aot_eager``), with zero recompiles over several swaps, in inference and in a training step; a swap that cannot
fit is refused with the layer and the reason, and leaves the model bit-identical."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch._dynamo.utils import counters

import grafting
from grafting.api.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from grafting.errors import AdapterStateError
from grafting.testing import assert_close, assert_identical, randomize_adapters


class Net(nn.Module):
    """Every layer type the methods adapt, small enough to compile in seconds: an embedding, a linear layer, a
    layer norm, a 2-d convolution (3×3) over the features laid out as a 4×4 image, a linear head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(24, 8)
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(128, 6)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.relu(self.proj(self.embed(ids))))  # (batch, 16, 8)
        image = h.transpose(1, 2).reshape(-1, 8, 4, 4)
        return self.head(torch.relu(self.conv(image)).flatten(1))


#: method -> (config of the swapped-in adapter number i, for i = 0, 1, 2; the target rank (None: no rank)).
#: Adapter 0 is the one compiled; 1 has the largest rank; the alphas differ.
Configs = Callable[[int], grafting.AdapterConfig]
METHODS: dict[str, tuple[Configs, int | None]] = {
    "lora": (
        lambda i: grafting.LoraConfig(
            r=(2, 4, 1)[i], lora_alpha=(4, 3, 8)[i], target_modules=["embed", "proj", "conv", "head"]
        ),
        4,
    ),
    "dora": (
        lambda i: grafting.LoraConfig(r=(2, 4, 1)[i], lora_alpha=(4, 3, 8)[i], use_dora=True, target_modules=["proj"]),
        4,
    ),
    "loha": (
        lambda i: grafting.LoHaConfig(r=(2, 4, 1)[i], alpha=(4, 3, 8)[i], target_modules=["proj", "conv", "head"]),
        4,
    ),
    "loha-effective-conv": (
        lambda i: grafting.LoHaConfig(
            r=(2, 3, 1)[i], alpha=(4, 3, 8)[i], use_effective_conv2d=True, target_modules=["conv"]
        ),
        3,
    ),
    # ranks 2 and 3 hold proj's and conv's W2 whole, rank 1 as a product; head's halves are products throughout
    "lokr": (
        lambda i: grafting.LoKrConfig(
            r=(2, 3, 1)[i], alpha=(4, 3, 8)[i], decompose_both=True, target_modules=["proj", "conv", "head"]
        ),
        3,
    ),
    "ia3": (lambda i: grafting.IA3Config(target_modules=["proj", "conv"], feedforward_modules=["proj"]), None),
    "vera": (
        lambda i: grafting.VeraConfig(r=(2, 4, 1)[i], projection_prng_key=i, target_modules=["proj", "head"]),
        4,
    ),
    "vera-drawn": (  # projections not saved: drawn again from each file's key
        lambda i: grafting.VeraConfig(
            r=(2, 4, 1)[i], projection_prng_key=10 + i, save_projection=False, target_modules=["proj", "head"]
        ),
        4,
    ),
    "oft": (lambda i: grafting.OFTConfig(r=2, oft_block_size=0, target_modules=["embed", "proj", "conv"]), None),
    "boft": (lambda i: grafting.BOFTConfig(boft_block_size=4, target_modules=["proj", "conv"]), None),
    "adalora": (
        lambda i: grafting.AdaLoraConfig(
            init_r=(2, 4, 1)[i], lora_alpha=(4, 3, 8)[i], total_step=10, target_modules=["proj", "conv", "head"]
        ),
        4,
    ),
    "ln_tuning": (lambda i: grafting.LNTuningConfig(target_modules=["norm"]), None),
}


def _save(folder: Path, config: grafting.AdapterConfig, seed: int) -> Path:
    model = grafting.get_peft_model(Net(), config)
    randomize_adapters(model, seed=seed)
    model.save_pretrained(folder)
    return folder


def _fresh(folder: Path, training: bool) -> grafting.PeftModel:
    return grafting.PeftModel.from_pretrained(Net(), folder, is_trainable=training).train(training)


def _graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


IDS = torch.randint(0, 24, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mode", ["inference", "training"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_swapped_adapter_computes_as_a_fresh_one_and_nothing_recompiles(
    tmp_path: Path, method: str, mode: str
) -> None:
    configs, target_rank = METHODS[method]
    training = mode == "training"
    saved = [_save(tmp_path / f"a{i}", configs(i), seed=i + 1) for i in range(3)]
    model = grafting.PeftModel.from_pretrained(Net(), saved[0], is_trainable=training)
    prepare_model_for_compiled_hotswap(model, target_rank=target_rank or 8)
    model.train(training)
    with model.disable_adapter(), torch.no_grad():
        base = model(IDS)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")

    def run(module: nn.Module) -> torch.Tensor:
        if not training:
            with torch.no_grad():
                return module(IDS)
        out = module(IDS)
        out.square().mean().backward()
        return out.detach()

    assert_close(run(compiled), _fresh(saved[0], training)(IDS).detach(), changed_from=base)
    graphs = _graphs()
    assert graphs >= 1
    storage = {name: (id(t), t.data_ptr()) for name, t in _tensors(model).items()}
    with torch.compiler.set_stance("fail_on_recompile"):
        for folder in [saved[1], saved[2], saved[0]]:
            hotswap_adapter(compiled, folder, adapter_name="default")
            expected = _fresh(folder, training)(IDS).detach()
            assert_close(run(compiled), expected, changed_from=base, msg=f"{method}: compiled, {folder.name}")
            assert_close(run(model), expected, changed_from=base, msg=f"{method}: eager, {folder.name}")
    assert _graphs() == graphs  # zero recompiles across the swaps
    assert {name: (id(t), t.data_ptr()) for name, t in _tensors(model).items()} == storage  # copied in place


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (non-persistent ones included: VeRA's drawn projections)."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


#: method -> (the loaded adapter's config, a config whose adapter cannot swap in, the reason in the error)
REFUSED: dict[str, tuple[grafting.AdapterConfig, grafting.AdapterConfig, str]] = {
    "lora-rank": (METHODS["lora"][0](0), METHODS["lora"][0](1), r"embed: the new adapter's rank 4 .* exceeds"),
    "loha-rank": (METHODS["loha"][0](0), METHODS["loha"][0](1), r"proj: the new adapter's rank 4 .* exceeds"),
    "loha-effective": (
        METHODS["loha-effective-conv"][0](0),
        grafting.LoHaConfig(r=2, alpha=4, target_modules=["conv"]),
        "conv: the new adapter's use_effective_conv2d",
    ),
    "lokr-split": (
        grafting.LoKrConfig(r=2, target_modules=["proj"]),
        grafting.LoKrConfig(r=2, decompose_factor=4, target_modules=["proj"]),
        "proj: .*Kronecker split",
    ),
    "ia3-side": (
        METHODS["ia3"][0](0),
        grafting.IA3Config(target_modules=["proj", "conv"], feedforward_modules=[]),
        "proj: the new adapter's scaled side",
    ),
    "vera-rank": (METHODS["vera"][0](0), METHODS["vera"][0](1), "exceeds the loaded one's 2"),
    "oft-blocks": (
        METHODS["oft"][0](0),
        grafting.OFTConfig(r=4, oft_block_size=0, target_modules=["embed", "proj", "conv"]),
        "embed: .*OFT's blocks .* are not a rank",
    ),
    "boft-blocks": (
        METHODS["boft"][0](0),
        grafting.BOFTConfig(boft_block_size=2, target_modules=["proj", "conv"]),
        "BOFT's layout .* is not a rank",
    ),
    "adalora-dropout": (
        METHODS["adalora"][0](0),
        grafting.AdaLoraConfig(init_r=2, lora_dropout=0.1, total_step=10, target_modules=["proj", "conv", "head"]),
        "lora_dropout",
    ),
    "ln_tuning-targets": (
        METHODS["ln_tuning"][0](0),
        grafting.LNTuningConfig(target_modules=["norm", "embed"]),
        "the loaded one lacks",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_swap_that_cannot_fit_is_refused_and_changes_nothing(tmp_path: Path, case: str) -> None:
    loaded, other, reason = REFUSED[case]
    model = grafting.PeftModel.from_pretrained(Net(), _save(tmp_path / "loaded", loaded, seed=1))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises((AdapterStateError, grafting.errors.AdapterLoadError), match=reason):
        hotswap_adapter(model, _save(tmp_path / "other", other, seed=2), "default")
    assert_identical(model.state_dict(), before)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_padding_keeps_the_outputs(tmp_path: Path, method: str) -> None:
    configs, _ = METHODS[method]
    model = grafting.PeftModel.from_pretrained(Net(), _save(tmp_path / "a", configs(0), seed=1))
    with torch.no_grad():
        before = model(IDS)
        prepare_model_for_compiled_hotswap(model, target_rank=6)
        after = model(IDS)
    assert_close(after, before)


#: rank methods -> config for (rank, alpha); LoKr on the head only, where every rank up to 3 is a product
RANKED: dict[str, Callable[[int, float], grafting.AdapterConfig]] = {
    "lora": lambda r, a: grafting.LoraConfig(r=r, lora_alpha=a, target_modules=["embed", "proj", "conv"]),
    "loha": lambda r, a: grafting.LoHaConfig(r=r, alpha=a, target_modules=["proj", "conv"]),
    "lokr": lambda r, a: grafting.LoKrConfig(r=r, alpha=a, decompose_both=True, target_modules=["head"]),
    "adalora": lambda r, a: grafting.AdaLoraConfig(init_r=r, lora_alpha=a, total_step=10, target_modules=["proj"]),
    "vera": lambda r, a: grafting.VeraConfig(r=r, projection_prng_key=int(a), target_modules=["proj", "head"]),
}


@settings(max_examples=3, deadline=None)
@pytest.mark.parametrize("method", sorted(RANKED))
@given(
    first=st.integers(1, 3),
    second=st.integers(1, 3),
    alpha=st.sampled_from([1.0, 2.0, 7.0]),
    seed=st.integers(0, 2**16),
)
def test_any_rank_up_to_the_target_and_any_alpha_swap_in_as_a_fresh_load(
    method: str, first: int, second: int, alpha: float, seed: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = tmp_path_factory.mktemp("swap")
    loaded = _save(folder / "loaded", RANKED[method](first, 4.0), seed=seed)
    other = _save(folder / "other", RANKED[method](second, alpha), seed=seed + 1)
    model = grafting.PeftModel.from_pretrained(Net(), loaded)
    prepare_model_for_compiled_hotswap(model, target_rank=3)
    with torch.no_grad():
        before = model(IDS)
        hotswap_adapter(model, other, "default")
        assert_close(model(IDS), _fresh(other, training=False)(IDS), changed_from=before)


def test_a_refused_padding_leaves_every_layer_as_it_was(tmp_path: Path) -> None:
    """``proj`` (rank 2) pads to 4 before ``head`` (rank 6) refuses to shrink: ``proj`` is rolled back."""
    config = grafting.LoraConfig(r=2, rank_pattern={"head": 6}, target_modules=["proj", "head"])
    model = grafting.PeftModel.from_pretrained(Net(), _save(tmp_path / "a", config, seed=1))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    proj = model.base_model.model.proj.adapters["default"]
    with pytest.raises(AdapterStateError, match=r"head: .*rank 6 cannot shrink to target_rank=4"):
        prepare_model_for_compiled_hotswap(model, target_rank=4)
    assert_identical(model.state_dict(), before)
    assert (proj.r, proj.lora_A.out_features, proj.lora_B.in_features) == (2, 2, 2)
