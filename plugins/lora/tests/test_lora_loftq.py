"""init_lora_weights="loftq": the base holds W quantized (bitsandbytes NF4/int8) and the adapter the rank-r
SVD of the quantization error (alternating with ``loftq_iter``), saved so that PEFT loads it (PEFT's own
LoftQ needs a GPU, so its side is the documented recipe: the adapter on the quantized base), merging,
mixing, and the errors."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import bitsandbytes.functional as bnbf
import peft
import pytest
import torch

from grafting import ConfigError, LoftQConfig, LoraConfig, PeftModel, get_peft_model
from grafting.testing import assert_close, tiny_model

TARGETS = ["q_proj", "v_proj", "down_proj"]


def ids() -> torch.Tensor:
    return torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(1))


def logits(model: Any, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids(), **kwargs).logits


def config(bits: int = 4, iters: int = 1, **kwargs: Any) -> LoraConfig:
    options = {"r": 4, "lora_alpha": 4, "target_modules": TARGETS, "init_lora_weights": "loftq"}
    return LoraConfig(**{**options, "loftq_config": LoftQConfig(loftq_bits=bits, loftq_iter=iters), **kwargs})


def quantized(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The oracle's quantizer: bitsandbytes' NF4 (blocks of 64) or row-wise int8, as PEFT's LoftQ calls it."""
    if bits == 4:
        packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type="nf4")
        return bnbf.dequantize_4bit(packed, state)
    codes, scales, _ = bnbf.int8_vectorwise_quant(weight)
    return bnbf.int8_vectorwise_dequant(codes, scales)


def best_rank(matrix: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def layers(model: Any) -> list[tuple[Any, torch.Tensor]]:
    """(adapted layer, original weight) pairs of the targets, the original from a fresh tiny model."""
    original = dict(tiny_model("llama").named_modules())
    return [
        (module, original[name.removeprefix("base_model.model.")].weight)
        for name, module in model.named_modules()
        if name.endswith(tuple(TARGETS)) and hasattr(module, "adapters")
    ]


@pytest.mark.parametrize(("bits", "iters", "dora"), [(4, 1, False), (8, 1, False), (4, 3, False), (4, 1, True)])
def test_quantized_base_and_factors_of_the_error(bits: int, iters: int, dora: bool) -> None:
    model = get_peft_model(tiny_model("llama"), config(bits, iters, use_dora=dora))
    for layer, w in layers(model):
        adapter = layer.adapters["default"]
        q = layer.base_layer.weight
        delta = adapter.lora_B.weight @ adapter.lora_A.weight * adapter.scaling
        # PEFT's definition: Q = quant(W − L·R) from the previous step's factors (none at first),
        # L·R = the rank-r SVD of W − Q; the last step's Q and factors are kept
        expected_q, low = quantized(w, bits), None
        for _ in range(iters - 1):
            low = best_rank(w - expected_q, 4).float()
            expected_q = quantized(w - low, bits)
        assert_close(q, expected_q, changed_from=w)
        if iters == 1:
            assert_close(delta.double(), best_rank(w - q, 4), rtol=1e-5, atol=1e-6)
        else:  # the SVD of a float32 residual: its rank-r part, to float32 rounding of the inputs
            assert_close(delta.double(), best_rank(w - q, 4), rtol=1e-4, atol=1e-5)
        error_before, error_after = (w - q).norm(), (w - q - delta).norm()
        assert error_after < 0.95 * error_before, (error_before, error_after)  # Q + s·B·A is closer to W than Q
        if dora:  # DoRA starts at the norms of the weight the forward sees
            assert_close(adapter.lora_magnitude_vector, torch.linalg.vector_norm(q + delta, dim=1))
    # the model is closer to the float model than the quantized base alone
    float_logits = logits(tiny_model("llama"))
    with model.disable_adapter():
        quantized_only = logits(model)
    assert (logits(model) - float_logits).norm() < (quantized_only - float_logits).norm()


def test_scaling_is_not_folded_into_the_factors_as_in_peft() -> None:
    """PEFT's LoftQ sets A = R, B = L whatever lora_alpha is; grafting gives the same factors."""
    one, two = (get_peft_model(tiny_model("llama"), config(lora_alpha=a)) for a in (4, 8))
    for (first, _), (second, _) in zip(layers(one), layers(two), strict=True):
        for name in ("lora_A", "lora_B"):
            assert_close(
                getattr(second.adapters["default"], name).weight, getattr(first.adapters["default"], name).weight
            )


def _trained(model: Any) -> Any:
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def test_saved_adapter_loads_both_ways(tmp_path: Path) -> None:
    ours = _trained(get_peft_model(tiny_model("llama"), config()))
    expected = logits(ours)
    with ours.disable_adapter():
        base_logits = logits(ours)
    ours.save_pretrained(tmp_path / "ours")
    # grafting replays the quantization on the original base, then loads the trained factors
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ours")
    assert_close(logits(loaded), expected, changed_from=base_logits)

    # PEFT's recipe: the adapter (config init_lora_weights=True) on the quantized base model
    quantized_base = copy.deepcopy(ours).unload()
    saved = ours.peft_config["default"]
    ours.peft_config["default"] = dataclasses.replace(saved, init_lora_weights=True, loftq_config={})
    ours.save_pretrained(tmp_path / "recipe")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(quantized_base), tmp_path / "recipe")
    assert_close(logits(theirs), expected, changed_from=base_logits)

    # and PEFT's adapter on that base, saved with PEFT's LoftQ config, loads in grafting on the float model
    theirs.peft_config["default"].init_lora_weights = "loftq"
    theirs.peft_config["default"].loftq_config = {"loftq_bits": 4, "loftq_iter": 1}
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "theirs")
    assert_close(logits(loaded), expected, changed_from=base_logits)


def test_merge_unmerge_and_mixing_on_one_layer() -> None:
    model = _trained(get_peft_model(tiny_model("llama").double(), config()))
    model.add_adapter("other", LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False))
    model.base_model.set_adapter(["default", "other"])
    expected = logits(model)
    with model.disable_adapter():
        base = logits(model)
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "base_layer" in k}
    model.merge_adapter()
    assert_close(logits(model), expected, changed_from=base, rtol=1e-9, atol=1e-9)
    model.unmerge_adapter()
    for key, value in model.get_base_model().state_dict().items():
        if key in before:
            assert_close(value, before[key], rtol=1e-9, atol=1e-9, msg=key)


def test_config_round_trip_and_errors() -> None:
    cfg = config(8, 2)
    assert cfg.to_dict()["loftq_config"] == {"loftq_bits": 8, "loftq_iter": 2}
    assert vars(peft.LoftQConfig(loftq_bits=8, loftq_iter=2)) == cfg.loftq_config  # PEFT's dict of it
    assert LoraConfig.from_dict(cfg.to_dict()) == cfg
    assert LoraConfig(target_modules=TARGETS).to_dict()["loftq_config"] == {}  # PEFT's default, written back
    with pytest.raises(ConfigError, match="loftq_config"):
        LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ConfigError, match="loftq_bits"):
        LoftQConfig(loftq_bits=3)
    with pytest.raises(ConfigError, match="loftq_iter"):
        config(iters=0)
    with pytest.raises(ConfigError, match="loftq_config"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"bits": 4})
    with pytest.warns(UserWarning, match="loftq_config is ignored"):
        assert LoraConfig(loftq_config=LoftQConfig()).loftq_config == {}
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"embed_tokens.*linear"):
        get_peft_model(model, config(target_modules=["q_proj", "embed_tokens"]))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing quantized
