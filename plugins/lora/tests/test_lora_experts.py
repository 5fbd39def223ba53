"""LoRA on mixture-of-experts tensors (``target_parameters``) in tiny Qwen3-MoE, GPT-OSS (transposed experts with
biases) and Mixtral models, under transformers' eager, grouped_mm and batched_mm expert implementations: the
low-rank path (``LoraParameters.fused``) against the formed ``W + ΔW`` and against PEFT, values and gradients;
no expert-sized ``ΔW`` allocated in forward or backward; merged = unmerged, disabled = base, save -> load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from grafting import LoraConfig, PeftModel, get_peft_model
from grafting.testing import assert_close, assert_identical
from grafting_lora.parameters import LoraParameters

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
IMPLEMENTATIONS = ["eager", "grouped_mm", "batched_mm"]


def qwen3(impl: str, experts: int = 4, top_k: int = 2) -> nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_experts=experts,
        num_experts_per_tok=top_k,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        experts_implementation=impl,
    )
    return Qwen3MoeForCausalLM(config)


def gpt_oss(impl: str, experts: int = 4, top_k: int = 2) -> nn.Module:
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        layer_types=["full_attention"] * 2,
        experts_implementation=impl,
    )
    model = GptOssForCausalLM(config)
    with torch.no_grad():  # its expert biases start at zero: make them count
        for name, param in model.named_parameters():
            if "experts" in name and name.endswith("_bias"):
                param.normal_(0, 0.1)
    return model


def mixtral(impl: str, experts: int = 4, top_k: int = 2) -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        experts_implementation=impl,
    )
    return MixtralForCausalLM(config)


MODELS = {"qwen3": qwen3, "gpt_oss": gpt_oss, "mixtral": mixtral}


def base(kind: str, impl: str, dtype: torch.dtype = torch.float32, seed: int = 0, **shape: int) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[kind](impl, **shape).to(dtype).eval()


def lora(r: int = 3, alpha: int = 6, **options: Any) -> LoraConfig:
    options = {"target_modules": ["q_proj"], "target_parameters": EXPERTS, **options}
    return LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, **options)


def ids(batch: int = 3, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def set_fused(model: nn.Module, fused: bool) -> None:
    for module in model.modules():
        if isinstance(module, LoraParameters):
            module.fused = fused


def step(model: nn.Module, fused: bool, tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Logits and the trainable parameters' gradients of ``(logits · g).sum()`` (a fixed random ``g``)."""
    set_fused(model, fused)
    for param in model.parameters():
        param.grad = None
    logits = model(input_ids=ids() if tokens is None else tokens).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5)).to(logits.dtype)
    (logits * weights).float().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)  # the base stays frozen
    return logits.detach(), grads


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


CASES = [(kind, impl) for kind in MODELS for impl in IMPLEMENTATIONS]


@pytest.mark.parametrize(("kind", "impl"), CASES)
def test_low_rank_equals_formed_weight_and_peft(kind: str, impl: str, tmp_path: Path) -> None:
    """float32: the low-rank path, the formed ``W + ΔW`` (the reference) and PEFT agree, values and gradients."""
    model = get_peft_model(base(kind, impl), lora())
    with torch.no_grad():
        plain = base(kind, impl)(input_ids=ids()).logits
    fast, fast_grads = step(model, True)
    formed, formed_grads = step(model, False)
    assert_close(fast, formed, changed_from=plain)
    assert_close(fast_grads, formed_grads)

    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(base(kind, impl), tmp_path, is_trainable=True)
    logits = theirs(input_ids=ids()).logits
    logits.mul(torch.randn(logits.shape, generator=torch.Generator().manual_seed(5))).sum().backward()
    assert_close(fast, logits.detach())
    peft_grads = {n.replace(".default", ""): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert_close({n.replace(".adapters.default", ""): g for n, g in fast_grads.items()}, peft_grads)


@pytest.mark.parametrize(("kind", "impl"), [(k, i) for k in MODELS for i in ("eager", "batched_mm")])
def test_float64(kind: str, impl: str) -> None:
    """float64 (the CPU grouped kernel takes none): low-rank and formed agree to float64 rounding."""
    model = get_peft_model(base(kind, impl, torch.float64), lora())
    fast, fast_grads = step(model, True)
    formed, formed_grads = step(model, False)
    with torch.no_grad():
        plain = base(kind, impl, torch.float64)(input_ids=ids()).logits
    assert_close(fast, formed, changed_from=plain)
    assert_close(fast_grads, formed_grads)


@pytest.mark.parametrize(("kind", "impl"), [("qwen3", "eager"), ("qwen3", "grouped_mm"), ("gpt_oss", "grouped_mm")])
def test_bfloat16_within_rounding_of_float64(kind: str, impl: str) -> None:
    """bf16 base, float32 adapters: the low-rank path (bf16 products) is within bf16 rounding of the float64
    result, and no further from it than the formed ``W + ΔW`` (which rounds ``ΔW`` into bf16 ``W``)."""
    model = get_peft_model(base(kind, impl, torch.bfloat16), lora(alpha=12))
    exact = get_peft_model(base(kind, "eager", torch.float64), lora(alpha=12))  # CPU grouped_mm takes no float64
    with torch.no_grad():
        for (name, mine), (twin, theirs) in zip(model.named_parameters(), exact.named_parameters(), strict=True):
            assert name == twin
            theirs.copy_(mine)  # the same weights, in float64
    truth, truth_grads = step(exact, False)
    fast, fast_grads = step(model, True)
    formed, formed_grads = step(model, False)
    with torch.no_grad():
        plain = base(kind, "eager", torch.float64)(input_ids=ids()).logits
    eps = torch.finfo(torch.bfloat16).eps
    assert _relative(fast, truth) <= 2 * eps
    assert _relative(fast, truth) <= 1.5 * _relative(formed, truth)
    assert _relative(plain, truth) > 10 * eps  # the adapter moves the logits by more than the tolerance
    for name, grad in truth_grads.items():
        assert _relative(fast_grads[name], grad) <= 8 * eps, name
        assert _relative(fast_grads[name], grad) <= 1.5 * _relative(formed_grads[name], grad) + eps, name


class ExpertSizedResults(TorchDispatchMode):
    """Records every new tensor (not a view) whose shape is an adapted expert tensor's or its transpose."""

    def __init__(self, shapes: set[tuple[int, ...]]) -> None:
        super().__init__()
        self.shapes = shapes | {(*s[:-2], s[-1], s[-2]) for s in shapes}
        self.seen: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        views = any(r.alias_info is not None for r in func._schema.returns)
        for result in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(result, torch.Tensor) and not views and tuple(result.shape) in self.shapes:
                self.seen.append((str(func), tuple(result.shape)))
        return out


@pytest.mark.parametrize(("kind", "impl"), CASES)
def test_no_expert_sized_delta_is_formed(kind: str, impl: str) -> None:
    """Forward and backward allocate no tensor of an expert tensor's shape: ``ΔW`` is never formed (the
    reference path, checked by the same watcher, forms it)."""
    model = get_peft_model(base(kind, impl, experts=5, top_k=2), lora())
    shapes = {tuple(p.shape) for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))}
    assert all(len(s) == 3 for s in shapes)
    seen = {}
    for fused in (True, False):
        watch = ExpertSizedResults(shapes)
        with watch:
            step(model, fused)
        seen[fused] = watch.seen
    assert seen[True] == []
    assert seen[False]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_two_adapters_on_one_tensor(impl: str) -> None:
    """Two active adapters on the same expert tensors add their terms to one low-rank weight."""
    model = get_peft_model(base("qwen3", impl), lora())
    model.add_adapter("other", lora(r=2, alpha=3))
    model.base_model.set_adapter(["default", "other"])
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    fast, fast_grads = step(model, True)
    formed, formed_grads = step(model, False)
    model.base_model.set_adapter("default")
    with torch.no_grad():
        one = model(input_ids=ids()).logits
    assert_close(fast, formed, changed_from=one)
    assert_close(fast_grads, formed_grads)


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_precision_adapter_forms_the_weight(impl: str) -> None:
    """``precision="adapter"`` keeps PEFT's numerics: the formed ``W + ΔW``, bit for bit the reference."""
    model = get_peft_model(base("qwen3", impl, torch.bfloat16), lora(precision="adapter"))
    with torch.no_grad():
        adapter = model(input_ids=ids()).logits
        set_fused(model, False)
        formed = model(input_ids=ids()).logits
    assert_identical(adapter, formed)


@settings(max_examples=5, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(
    kind=st.sampled_from(sorted(MODELS)),
    impl=st.sampled_from(IMPLEMENTATIONS),
    experts=st.integers(2, 5),
    r=st.integers(1, 4),
    alpha=st.sampled_from([1, 4, 8]),
    seed=st.integers(0, 2**16),
)
def test_merge_disable_save_load(
    kind: str, impl: str, experts: int, r: int, alpha: int, seed: int, tmp_path_factory: Any
) -> None:
    """Random small models: merged = unmerged, disabled = base, save -> load gives identical weights, the same outputs."""
    folder = tmp_path_factory.mktemp("experts")
    shape = {"experts": experts, "top_k": min(2, experts)}
    torch.manual_seed(seed)
    model = get_peft_model(base(kind, impl, **shape), lora(r=r, alpha=alpha))
    tokens = ids(seed=seed)
    with torch.no_grad():
        plain = base(kind, impl, **shape)(input_ids=tokens).logits
        unmerged = model(input_ids=tokens).logits
        with model.disable_adapter():
            assert_identical(model(input_ids=tokens).logits, plain)
    model.save_pretrained(folder)
    loaded = PeftModel.from_pretrained(base(kind, impl, **shape), folder)
    saved = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert_identical({k: v for k, v in loaded.state_dict().items() if "lora_" in k}, saved)
    with torch.no_grad():  # the same weights; their products may round apart (loaded tensors sit at other alignments)
        assert_close(loaded(input_ids=tokens).logits, unmerged, rtol=1e-6, atol=1e-6)
        model.merge_adapter()  # last: unmerging restores the base weights up to rounding only
        merged = model(input_ids=tokens).logits
    assert_close(merged, unmerged, changed_from=plain)
