"""Hot-swapping an adapter that targets a subset of the loaded adapter's layers (PEFT accepts it): the layers the
new file has no tensors for are left without effect (``LayerAdapter.hotswap_blank_values``), so the swapped model
computes what a fresh load of the new adapter computes, and what PEFT's swap gives; a method that cannot leave a
layer without effect refuses and changes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import grafting
from grafting.api.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from grafting.errors import AdapterStateError
from grafting.testing import assert_close, assert_identical, randomize_adapters, tiny_llama
from tests.test_hotswap_methods import IDS, Net
from tests.toy_methods import ToyOutputConfig

#: the loaded adapter's targets on tiny_llama; a new adapter takes some of them
LOADED = ["q_proj", "k_proj", "v_proj", "o_proj"]
TOKENS = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(5))


def _save(folder: Path, config: grafting.AdapterConfig, seed: int, base: Any = tiny_llama) -> Path:
    model = grafting.get_peft_model(base(), config)
    randomize_adapters(model, seed=seed)
    model.save_pretrained(folder)
    return folder


@torch.no_grad()
def _logits(model: Any) -> torch.Tensor:
    return model(input_ids=TOKENS).logits


def _fresh(folder: Path, base: Any = tiny_llama) -> grafting.PeftModel:
    return grafting.PeftModel.from_pretrained(base(), folder)


@settings(max_examples=4, deadline=None)
@given(
    covered=st.lists(st.sampled_from(LOADED), min_size=1, max_size=len(LOADED) - 1, unique=True),
    rank=st.integers(1, 4),
    alpha=st.sampled_from([1.0, 4.0, 9.0]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_a_subset_swaps_in_as_a_fresh_load_and_as_peft_swaps_it(
    covered: list[str], rank: int, alpha: float, bias: bool, seed: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from peft import PeftModel as PeftsModel
    from peft.utils.hotswap import hotswap_adapter as peft_hotswap_adapter

    folder = tmp_path_factory.mktemp("subset")
    loaded = _save(
        folder / "loaded", grafting.LoraConfig(r=4, lora_alpha=8, lora_bias=bias, target_modules=LOADED), seed
    )
    subset_config = grafting.LoraConfig(r=rank, lora_alpha=alpha, lora_bias=bias, target_modules=covered)
    subset = _save(folder / "subset", subset_config, seed + 1)
    ours = _fresh(loaded)
    before = _logits(ours)
    hotswap_adapter(ours, subset, "default")
    assert_close(_logits(ours), _logits(_fresh(subset)), changed_from=before, msg="against a fresh load")
    theirs = PeftsModel.from_pretrained(tiny_llama(), str(loaded))
    peft_hotswap_adapter(theirs, str(subset), "default", torch_device="cpu")
    assert_close(_logits(ours), _logits(theirs), changed_from=before, msg="against PEFT's swap")


#: method -> (the loaded adapter's config, the new one's, covering fewer layers), on every layer type of ``Net``
NET_SUBSETS: dict[str, tuple[grafting.AdapterConfig, grafting.AdapterConfig]] = {
    "lora": (
        grafting.LoraConfig(r=3, lora_alpha=5, target_modules=["embed", "proj", "conv", "head"]),
        grafting.LoraConfig(r=2, lora_alpha=7, target_modules=["head"]),
    ),
    "dora": (  # the magnitude of the embedding (dim,), the linear layer (out,) and the convolution (1, out, 1, 1)
        grafting.LoraConfig(r=3, lora_alpha=5, use_dora=True, target_modules=["embed", "proj", "conv"]),
        grafting.LoraConfig(r=2, lora_alpha=7, use_dora=True, target_modules=["proj"]),
    ),
    "ia3": (
        grafting.IA3Config(target_modules=["proj", "conv", "head"], feedforward_modules=["proj"]),
        grafting.IA3Config(target_modules=["proj", "head"], feedforward_modules=["proj"]),
    ),
    "loha": (  # a linear layer and a convolution (its kernel flattened into the factors) left without effect
        grafting.LoHaConfig(r=3, alpha=5, target_modules=["proj", "conv", "head"]),
        grafting.LoHaConfig(r=2, alpha=7, target_modules=["head"]),
    ),
    "loha-effective-conv": (  # the convolution's cores hada_t1/hada_t2 too
        grafting.LoHaConfig(r=2, alpha=5, use_effective_conv2d=True, target_modules=["proj", "conv"]),
        grafting.LoHaConfig(r=3, alpha=7, use_effective_conv2d=True, target_modules=["proj"]),
    ),
    "lokr": (  # rank 1: W2 a product (the convolution's kernel in its factor), head's W1 too (decompose_both)
        grafting.LoKrConfig(r=1, alpha=5, decompose_both=True, target_modules=["proj", "conv", "head"]),
        grafting.LoKrConfig(r=1, alpha=7, decompose_both=True, target_modules=["head"]),
    ),
    "lokr-whole": (  # rank 2: proj's and conv's W2 whole (lokr_w2)
        grafting.LoKrConfig(r=2, alpha=5, target_modules=["proj", "conv"]),
        grafting.LoKrConfig(r=3, alpha=7, target_modules=["proj"]),
    ),
    "lokr-effective-conv": (  # the convolution's core lokr_t2
        grafting.LoKrConfig(r=1, alpha=5, use_effective_conv2d=True, target_modules=["proj", "conv"]),
        grafting.LoKrConfig(r=1, alpha=7, use_effective_conv2d=True, target_modules=["proj"]),
    ),
    "adalora": (
        grafting.AdaLoraConfig(init_r=3, lora_alpha=5, total_step=10, target_modules=["proj", "conv", "head"]),
        grafting.AdaLoraConfig(init_r=2, lora_alpha=7, total_step=10, target_modules=["head"]),
    ),
    "oft": (  # the embedding (an output rotation), the linear layer (input) and the convolution (its kernel)
        grafting.OFTConfig(r=2, oft_block_size=0, target_modules=["embed", "proj", "conv", "head"]),
        grafting.OFTConfig(r=2, oft_block_size=0, target_modules=["head"]),
    ),
    "oft-neumann-coft": (  # the Cayley-Neumann series, COFT's projection
        grafting.OFTConfig(
            r=2, oft_block_size=0, coft=True, eps=0.5, use_cayley_neumann=True, target_modules=["proj", "head"]
        ),
        grafting.OFTConfig(r=2, oft_block_size=0, coft=True, eps=0.5, use_cayley_neumann=True, target_modules=["head"]),
    ),
    "boft": (  # the linear layer (its output scale) and the convolution (the rotated, scaled kernel)
        grafting.BOFTConfig(boft_block_size=4, target_modules=["proj", "conv", "head"]),
        grafting.BOFTConfig(boft_block_size=4, target_modules=["head"]),
    ),
    "boft-butterfly": (  # two butterfly factors
        grafting.BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2, target_modules=["proj", "head"]),
        grafting.BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2, target_modules=["head"]),
    ),
    "ln_tuning": (  # the layer norm's weight and bias back to the base layer's
        grafting.LNTuningConfig(target_modules=["norm", "proj"]),
        grafting.LNTuningConfig(target_modules=["proj"]),
    ),
}


def _uncovered(model: Any, loaded: grafting.AdapterConfig, covering: grafting.AdapterConfig) -> dict[str, Any]:
    """The adapted layers of ``model`` that ``loaded`` targets and ``covering`` does not, by path."""
    names = set(loaded.target_modules) - set(covering.target_modules)
    return {path: layer for path, layer in model.base_model.adapted_layers() if path.rsplit(".", 1)[-1] in names}


def _input_for(layer: torch.nn.Module) -> torch.Tensor:
    """An input of ``layer``'s base layer: token ids, features, or a 4×4 image of its channels."""
    generator = torch.Generator().manual_seed(7)
    if isinstance(layer, torch.nn.Embedding):
        return torch.randint(0, layer.num_embeddings, (2, 5), generator=generator)
    if isinstance(layer, torch.nn.Conv2d):
        return torch.randn(2, layer.in_channels, 4, 4, generator=generator)
    if isinstance(layer, torch.nn.LayerNorm):
        return torch.randn(3, *layer.normalized_shape, generator=generator)
    return torch.randn(3, layer.in_features, generator=generator)


def check_subset_swap(
    folder: Path,
    loaded_config: grafting.AdapterConfig,
    covering: grafting.AdapterConfig,
    base: Any,
    call: Any,
    target_rank: int = 4,
) -> None:
    """Into a compiled model holding ``loaded_config``'s adapter, the ``covering`` one (fewer layers) swaps in and
    computes as a fresh load of it; every layer it does not cover computes its base layer's output; the loaded
    adapter swaps back; nothing recompiles."""
    loaded = _save(folder / "loaded", loaded_config, seed=1, base=base)
    subset = _save(folder / "subset", covering, seed=2, base=base)
    model = _fresh(loaded, base=base)
    prepare_model_for_compiled_hotswap(model, target_rank=target_rank)
    uncovered = _uncovered(model, loaded_config, covering)
    assert uncovered
    inputs = {path: _input_for(layer.base_layer) for path, layer in uncovered.items()}
    with torch.no_grad():
        adapted = {path: layer(inputs[path]) for path, layer in uncovered.items()}
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        before = call(compiled)
        graphs = int(counters["stats"]["unique_graphs"])
        assert graphs >= 1
        with torch.compiler.set_stance("fail_on_recompile"):
            hotswap_adapter(compiled, subset, "default")
            swapped = call(compiled)
        assert_close(swapped, call(_fresh(subset, base=base)), changed_from=before, msg="against a fresh load")
        for path, layer in uncovered.items():
            base_out = layer.base_layer(inputs[path])
            assert_close(layer(inputs[path]), base_out, changed_from=adapted[path], msg=f"{path} left as its base")
        with torch.compiler.set_stance("fail_on_recompile"):
            hotswap_adapter(compiled, loaded, "default")  # the layers left without effect take values again
            assert_close(call(compiled), before, changed_from=swapped, msg="swapped back")
    assert int(counters["stats"]["unique_graphs"]) == graphs


@pytest.mark.parametrize("method", sorted(NET_SUBSETS))
def test_each_layer_type_left_without_effect_computes_as_a_fresh_load_and_its_base(tmp_path: Path, method: str) -> None:
    loaded, covering = NET_SUBSETS[method]
    check_subset_swap(tmp_path, loaded, covering, Net, lambda model: model(IDS))


@pytest.mark.parametrize("save_projection", [True, False])
def test_vera_layers_left_without_effect_computes_as_a_fresh_load_and_its_base(
    tmp_path: Path, save_projection: bool
) -> None:
    """VeRA's uncovered layers get ``λ_b = λ_d = 0``; the shared projections are the new adapter's (from its file or
    drawn from its key). On tiny_llama: the new adapter's projections must have the loaded one's sizes."""

    def config(r: int, key: int, targets: list[str]) -> grafting.VeraConfig:
        return grafting.VeraConfig(
            r=r, projection_prng_key=key, save_projection=save_projection, target_modules=targets
        )

    check_subset_swap(tmp_path, config(2, 1, LOADED), config(3, 2, ["q_proj", "o_proj"]), tiny_llama, _logits)


def test_dora_layers_left_without_effect_give_the_base_output(tmp_path: Path) -> None:
    """The magnitude of a DoRA layer the new file does not cover becomes ``‖W‖`` (``B`` zero), so the layer computes
    its base layer's output, as a fresh load of the new adapter (which does not adapt it) does. PEFT's swap zeroes
    every ``lora_`` tensor of such a layer, the magnitude included, which scales the layer's output to zero (its
    bias only): wrong for DoRA (and 0.21.2 stops before that, on a KeyError for the magnitude's key)."""
    loaded = _save(tmp_path / "loaded", grafting.LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=LOADED), 1)
    subset_config = grafting.LoraConfig(r=2, lora_alpha=6, use_dora=True, target_modules=["q_proj"])
    subset = _save(tmp_path / "subset", subset_config, 2)
    model = _fresh(loaded)
    v_proj = model.base_model.model.model.layers[0].self_attn.v_proj
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        adapted, base = v_proj(x), v_proj.base_layer(x)
    before = _logits(model)
    hotswap_adapter(model, subset, "default")
    with torch.no_grad():
        assert_close(v_proj(x), base, changed_from=adapted)
    assert_close(_logits(model), _logits(_fresh(subset)), changed_from=before)


@pytest.mark.parametrize("dora", [False, True])
def test_a_compiled_model_swaps_a_subset_and_back_without_recompiling(tmp_path: Path, dora: bool) -> None:
    def config(r: int, alpha: float, targets: list[str]) -> grafting.LoraConfig:
        return grafting.LoraConfig(r=r, lora_alpha=alpha, use_dora=dora, target_modules=targets)

    full = _save(tmp_path / "full", config(2, 4, LOADED), 1)
    subset = _save(tmp_path / "subset", config(3, 5, ["q_proj", "o_proj"]), 2)
    other = _save(tmp_path / "other", config(1, 3, LOADED), 3)
    model = _fresh(full)
    prepare_model_for_compiled_hotswap(model, target_rank=3)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    before = _logits(compiled)
    graphs = int(counters["stats"]["unique_graphs"])
    assert graphs >= 1
    with torch.compiler.set_stance("fail_on_recompile"):
        hotswap_adapter(compiled, subset, "default")
        assert_close(_logits(compiled), _logits(_fresh(subset)), changed_from=before, msg="the subset")
        hotswap_adapter(compiled, other, "default")  # the layers left without effect take values again
        assert_close(_logits(compiled), _logits(_fresh(other)), changed_from=_logits(_fresh(subset)), msg="all")
    assert int(counters["stats"]["unique_graphs"]) == graphs


@pytest.mark.usefixtures("toy_methods")
def test_a_method_that_cannot_leave_a_layer_without_effect_refuses_and_changes_nothing(tmp_path: Path) -> None:
    """TOY_OUTPUT (tests/toy_methods.py) hot-swaps but has no ``hotswap_blank_values``: the protocol's default
    refuses a file that leaves one of its layers uncovered."""
    loaded = _save(tmp_path / "loaded", ToyOutputConfig(target_modules=["q_proj", "v_proj"]), 1)
    full = _save(tmp_path / "full", ToyOutputConfig(target_modules=["q_proj", "v_proj"]), 2)
    subset = _save(tmp_path / "subset", ToyOutputConfig(target_modules=["q_proj"]), 3)
    model = _fresh(loaded)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        AdapterStateError, match=r"v_proj: the new adapter has no tensors for this layer, and .* cannot leave this"
    ):
        hotswap_adapter(model, subset, "default")
    assert_identical(model.state_dict(), before)
    hotswap_adapter(model, full, "default")  # a file covering every layer swaps in
    assert_close(_logits(model), _logits(_fresh(full)), changed_from=_logits(_fresh(loaded)))
