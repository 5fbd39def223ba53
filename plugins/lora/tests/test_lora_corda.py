"""init_lora_weights="corda": preprocess_corda's covariance-weighted SVD (IPM and KPM) gives the same factors
and residual as PEFT's, the saved adapter loads both ways (after the same preprocessing, or converted to plain
LoRA on the original weights), merge = unmerge, mixing, the cache and covariance files, and the errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from lora_option_helpers import assert_merge_round_trip, peft_config_of
from peft.tuners.lora.corda import preprocess_corda as peft_preprocess_corda

from grafting import ConfigError, CordaConfig, LoraConfig, PeftModel, get_peft_model, preprocess_corda
from grafting.testing import assert_close, tiny_model

TARGETS = ["q_proj", "v_proj", "down_proj"]


def ids() -> torch.Tensor:
    return torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(1))


def logits(model: Any, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids(), **kwargs).logits


def config(method: str = "ipm", **kwargs: Any) -> LoraConfig:
    options: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": "corda"}
    return LoraConfig(**{**options, "corda_config": CordaConfig(corda_method=method), **kwargs})


def sampler(model: Any) -> Any:
    """run_model for preprocessing: one sequence per call, as PEFT's hook expects."""
    data = torch.randint(0, 64, (24, 12), generator=torch.Generator().manual_seed(7))

    def run() -> None:
        for row in data:
            model(input_ids=row[None])

    return run


def ours_and_peft(cfg: LoraConfig, arch: str = "llama") -> tuple[Any, Any]:
    base = tiny_model(arch)
    preprocess_corda(base, cfg, run_model=sampler(base))
    reference = tiny_model(arch)
    peft_cfg = peft_config_of(cfg)
    peft_preprocess_corda(reference, peft_cfg, run_model=sampler(reference))
    return get_peft_model(base, cfg), peft.get_peft_model(reference, peft_cfg)


def adapted(model: Any, targets: list[str] = TARGETS) -> dict[str, Any]:
    """The adapted layers by their names in the plain model."""
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if n.endswith(tuple(targets))}


@torch.no_grad()
def train(model: Any, seed: int = 3) -> Any:
    gen = torch.Generator().manual_seed(seed)
    for _name, p in sorted(
        (n.replace(".adapters.default", "").replace(".default", ""), p)
        for n, p in model.named_parameters()
        if "lora_" in n
    ):
        p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


@pytest.mark.parametrize(
    ("arch", "method", "targets"),
    [("llama", "ipm", TARGETS), ("llama", "kpm", TARGETS), ("gpt2", "ipm", ["c_attn", "c_fc"])],  # gpt2: Conv1D
)
def test_same_factors_and_residual_as_peft(arch: str, method: str, targets: list[str]) -> None:
    cfg = config(method, target_modules=targets, fan_in_fan_out=arch == "gpt2")
    ours, theirs = ours_and_peft(cfg, arch)
    original = dict(tiny_model(arch).named_modules())
    mine, reference = adapted(ours, targets), adapted(theirs, targets)
    assert len(mine) == 2 * len(targets)  # two layers
    for name, layer in mine.items():
        peft_layer = reference[name]
        w = original[name].weight
        assert_close(layer.base_layer.weight, peft_layer.base_layer.weight, changed_from=w, msg=name)
        a, b = layer.adapters["default"].lora_A.weight, layer.adapters["default"].lora_B.weight
        pa, pb = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
        signs = torch.sign((a * pa).sum(1))  # each singular pair is defined up to a joint sign
        assert_close(a * signs[:, None], pa, msg=name)
        assert_close(b * signs[None, :], pb, msg=name)
        assert not hasattr(layer.base_layer, "eigens")  # used once, as PEFT
    assert_close(logits(ours), logits(tiny_model(arch)), rtol=1e-4, atol=1e-5)  # starts as the base model


def test_saved_adapter_loads_both_ways(tmp_path: Path) -> None:
    cfg = config()
    ours, theirs = ours_and_peft(cfg)
    ours.save_pretrained(tmp_path / "ours_init")
    theirs.peft_config["default"].init_lora_weights = True
    theirs.save_pretrained(tmp_path / "theirs_init")
    train(ours)
    train(theirs)
    expected = logits(ours)
    base_logits = logits(tiny_model("llama"))
    ours.save_pretrained(tmp_path / "ours")
    # after the same preprocessing of the original model, either library re-creates the residual
    fresh = tiny_model("llama")
    peft_preprocess_corda(fresh, peft_config_of(cfg), run_model=sampler(fresh))
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "ours")
    assert_close(logits(loaded), expected, changed_from=base_logits)
    fresh = tiny_model("llama")
    preprocess_corda(fresh, cfg, run_model=sampler(fresh))
    assert_close(logits(PeftModel.from_pretrained(fresh, tmp_path / "ours")), expected, changed_from=base_logits)
    # converted to plain LoRA on the original weights (PEFT's conversion), loaded by the other library
    ours.save_pretrained(tmp_path / "ours_lora", path_initial_model_for_weight_conversion=tmp_path / "ours_init")
    theirs.save_pretrained(
        tmp_path / "theirs_lora", path_initial_model_for_weight_conversion=str(tmp_path / "theirs_init")
    )
    plain = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ours_lora")
    assert plain.peft_config["default"].init_lora_weights is True
    assert_close(logits(plain), expected, changed_from=base_logits, rtol=1e-4, atol=1e-5)
    plain = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "theirs_lora")
    assert_close(logits(plain), expected, changed_from=base_logits, rtol=1e-4, atol=1e-5)


def test_merge_unmerge_and_mixing_on_one_layer() -> None:
    cfg = config("kpm")
    base = tiny_model("llama").double()
    preprocess_corda(base, cfg, run_model=sampler(base))
    model = train(get_peft_model(base, cfg))
    model.add_adapter("other", LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False))
    model.base_model.set_adapter(["default", "other"])
    assert_merge_round_trip(model, ids())


def test_cache_and_covariance_files(tmp_path: Path) -> None:
    cfg = config(corda_config=CordaConfig(cache_file=str(tmp_path / "c/cache.pt")))
    first = tiny_model("llama")
    preprocess_corda(first, cfg, run_model=sampler(first))
    expected = {n: m.eigens.U_WC.clone() for n, m in first.named_modules() if hasattr(m, "eigens")}
    assert len(expected) == 6
    again = tiny_model("llama")
    preprocess_corda(again, cfg)  # from the cache, no data
    for name, module in again.named_modules():
        if name in expected:
            assert torch.equal(module.eigens.U_WC, expected[name])
    cov = config(corda_config=CordaConfig(covariance_file=str(tmp_path / "cov.pt")))
    one = tiny_model("llama")
    preprocess_corda(one, cov, run_model=sampler(one))
    two = tiny_model("llama")
    preprocess_corda(two, config("kpm", corda_config=CordaConfig(covariance_file=str(tmp_path / "cov.pt"))))
    a, b = get_peft_model(one, cov), get_peft_model(two, cov)
    assert_close(logits(a), logits(b))


def test_errors() -> None:
    with pytest.raises(ConfigError, match="corda_method"):
        CordaConfig(corda_method="svd")
    with pytest.raises(ConfigError, match="corda_config has no option"):
        LoraConfig(init_lora_weights="corda", corda_config={"method": "ipm"})
    with pytest.warns(UserWarning, match="default CordaConfig"):
        assert LoraConfig(init_lora_weights="corda", target_modules=TARGETS).corda_config == CordaConfig()
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="run_model"):
        preprocess_corda(model, config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="preprocess_corda"):
        get_peft_model(model, config())
    preprocess_corda(model, config(target_modules=["q_proj"]), run_model=sampler(model))
    with pytest.raises(ConfigError, match=r"v_proj.*preprocess_corda"):  # q_proj decomposed, v_proj not: refused
        get_peft_model(model, config(target_modules=["q_proj", "v_proj"]))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="shapes"):  # preprocessed for another rank
        get_peft_model(model, config(r=2, target_modules=["q_proj"]))
