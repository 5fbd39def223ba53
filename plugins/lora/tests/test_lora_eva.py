"""init_lora_weights="eva": the incremental PCA of layer inputs over a dataloader, the rank redistribution and
the rebuilt config match PEFT's; the adapter saves and loads both ways, merge = unmerge, mixing, and the
errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from lora_option_helpers import TOL, assert_merge_round_trip, assert_rows_route_alone, peft_config_of

from grafting import (
    ConfigError,
    EvaConfig,
    LoraConfig,
    PeftModel,
    get_eva_state_dict,
    get_peft_model,
    initialize_lora_eva_weights,
)
from grafting.testing import assert_close, tiny_model

TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]
#: EVA's components come out of float32 SVDs whose last bits differ between the two implementations
#: (summation order); a component moves by up to ~3e-5 of its unit norm.
PCA_TOL = {"rtol": 1e-4, "atol": 2e-4}


def data(batches: int = 6) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(batches):
        input_ids = torch.randint(0, 64, (4, 10), generator=gen)
        labels = input_ids.clone()
        labels[:, :2] = -100  # left out of the PCA (use_label_mask)
        mask = torch.ones(4, 10, dtype=torch.long)
        mask[0, -3:] = 0  # padding: left out too
        out.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return out


def ids() -> torch.Tensor:
    return torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(1))


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids()).logits


def config(targets: list[str] = TARGETS, **eva: Any) -> LoraConfig:
    return LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights="eva", eva_config=EvaConfig(**{"tau": 0.9, **eva})
    )


def both(cfg: LoraConfig) -> tuple[Any, Any]:
    return get_peft_model(tiny_model("llama"), cfg), peft.get_peft_model(tiny_model("llama"), peft_config_of(cfg))


@torch.no_grad()
def train(model: Any) -> Any:
    gen = torch.Generator().manual_seed(5)
    named = sorted((n.replace(".adapters.default", "").replace(".default", ""), p) for n, p in model.named_parameters())
    for _, p in named:
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def a_matrices(model: Any) -> dict[str, torch.Tensor]:
    return {
        n.replace(".adapters.default", "").replace(".default", ""): p
        for n, p in model.named_parameters()
        if "lora_A" in n
    }


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"adjust_scaling_factors": False, "rho": 3.0},
        # whitening on layers with their own input: PEFT divides a PCA shared by q/k/v once per layer
        # (in place, on one tensor), so with shared inputs its components differ from the documented c/√s
        {"whiten": True, "targets": ["q_proj", "down_proj"]},
        {"rho": 1.0, "targets": ["q_proj", "down_proj"]},
    ],
)
def test_same_components_ranks_and_config_as_peft(options: dict[str, Any]) -> None:
    ours, theirs = both(config(**options))
    mine = get_eva_state_dict(ours, data(), show_progress_bar=False)
    reference = peft.get_eva_state_dict(theirs, data(), show_progress_bar=False)
    assert mine.keys() == reference.keys()
    for key, value in reference.items():
        assert mine[key].shape == value.shape, key
        assert_close(mine[key], value, msg=key, **PCA_TOL)
    initialize_lora_eva_weights(ours, eva_state_dict=mine)
    peft.initialize_lora_eva_weights(theirs, eva_state_dict=reference)
    got, expected = ours.peft_config["default"], theirs.peft_config["default"]
    assert sorted(got.target_modules) == sorted(expected.target_modules)
    assert got.rank_pattern == expected.rank_pattern
    assert got.alpha_pattern == expected.alpha_pattern
    if options.get("rho", 2.0) > 1:
        assert got.rank_pattern, "the example should move rank between layers"
    a, b = a_matrices(ours), a_matrices(theirs)
    assert a.keys() == b.keys()
    for key, value in b.items():
        assert_close(a[key], value, msg=key, **PCA_TOL)
    assert_close(logits(ours), logits(tiny_model("llama")))  # B = 0: starts as the base model


def test_saved_adapter_loads_both_ways(tmp_path: Path) -> None:
    ours, theirs = both(config())
    initialize_lora_eva_weights(ours, data(), show_progress_bar=False)
    peft.initialize_lora_eva_weights(theirs, data(), show_progress_bar=False)
    train(ours)
    train(theirs)
    expected = logits(ours)
    base = logits(tiny_model("llama"))
    assert_close(logits(theirs), expected, changed_from=base, **PCA_TOL)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ours")
    assert_close(logits(loaded), expected, changed_from=base)
    mine = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "theirs")
    assert_close(logits(mine), logits(theirs), changed_from=base)
    assert mine.peft_config["default"].rank_pattern == theirs.peft_config["default"].rank_pattern


def test_state_dict_of_the_plain_model_first(tmp_path: Path) -> None:
    """PEFT's low-memory recipe: components from the plain model, then the adapter, then the components."""
    cfg = config()
    plain = get_eva_state_dict(tiny_model("llama"), data(), peft_config=cfg, show_progress_bar=False)
    assert all(not key.startswith("base_model") for key in plain)
    empty = get_peft_model(tiny_model("llama"), cfg, low_cpu_mem_usage=True)  # adapters on the meta device
    model = initialize_lora_eva_weights(empty, eva_state_dict=plain)
    assert all(not p.is_meta for p in model.parameters())
    direct = get_peft_model(tiny_model("llama"), cfg)
    initialize_lora_eva_weights(direct, data(), show_progress_bar=False)
    for key, value in a_matrices(direct).items():
        assert_close(a_matrices(model)[key], value, msg=key)


def test_rank_zero_layers_leave_the_adapter_as_in_peft() -> None:
    ours, theirs = both(config(adjust_scaling_factors=True))
    gen = torch.Generator().manual_seed(2)
    prefix = "base_model.model.model.layers."
    components = {
        f"{prefix}0.self_attn.q_proj": torch.randn(6, 16, generator=gen),
        f"{prefix}0.self_attn.k_proj": torch.zeros(0, 16),
        f"{prefix}1.mlp.down_proj": torch.randn(2, 32, generator=gen),
    }  # the other targets are missing: they keep the plain start, with a warning
    with pytest.warns(UserWarning, match="EVA"):
        initialize_lora_eva_weights(ours, eva_state_dict=dict(components))
    peft.initialize_lora_eva_weights(theirs, eva_state_dict=dict(components))
    got, expected = ours.peft_config["default"], theirs.peft_config["default"]
    assert sorted(got.target_modules) == sorted(expected.target_modules)
    assert "model.layers.0.self_attn.k_proj" not in got.target_modules
    assert (got.rank_pattern, got.alpha_pattern) == (expected.rank_pattern, expected.alpha_pattern)
    layer = ours.base_model.model.model.layers[0].self_attn
    assert "default" not in getattr(layer.k_proj, "adapters", {})
    assert_close(layer.q_proj.adapters["default"].lora_A.weight, components[f"{prefix}0.self_attn.q_proj"])
    assert ours.active_adapters == ["default"]
    assert any(p.requires_grad for n, p in ours.named_parameters() if "lora_A" in n)


def test_merge_unmerge_and_mixing_on_one_layer() -> None:
    model = get_peft_model(tiny_model("llama").double(), config())
    initialize_lora_eva_weights(model, data(), show_progress_bar=False)
    train(model)
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    train(model)
    model.base_model.set_adapter(["default", "other"])
    assert_merge_round_trip(model, ids())
    # per-sample routing: each row as its adapter alone
    assert_rows_route_alone(model, ids(), ["other", "__base__", "default"], **TOL)


def test_errors() -> None:
    for field, value in (("rho", 0.5), ("tau", 1.5), ("whiten", 1), ("label_mask_value", "x")):
        with pytest.raises(ConfigError, match=f"EvaConfig.{field}"):
            EvaConfig(**{field: value})
    with pytest.warns(UserWarning, match="default EvaConfig"):
        assert LoraConfig(init_lora_weights="eva", target_modules=TARGETS).eva_config == EvaConfig()
    plain = get_peft_model(tiny_model("llama"), LoraConfig(target_modules=TARGETS))
    with pytest.raises(ConfigError, match="not 'eva'"):
        initialize_lora_eva_weights(plain, data())
    model = get_peft_model(tiny_model("llama"), config())
    with pytest.raises(ConfigError, match="dataloader"):
        initialize_lora_eva_weights(model)
    with pytest.raises(ConfigError, match="empty"):
        initialize_lora_eva_weights(model, [])
    with pytest.raises(ConfigError, match="peft_config"):
        get_eva_state_dict(tiny_model("llama"), data())
    sparse = data(2)
    for batch in sparse:  # 5 positions left: fewer rows than the 8 components each layer may take
        batch["attention_mask"][:] = 0
        batch["attention_mask"][0, 2:7] = 1
    with pytest.raises(ConfigError, match="rows"):  # PEFT loops forever here
        initialize_lora_eva_weights(model, sparse, show_progress_bar=False)
