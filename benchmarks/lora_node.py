"""One LoRA layer's one-node forward+backward (and no-grad forward): this round's form against the previous.

Usage: python benchmarks/lora_node.py [--device cuda] [--tokens 8192] [--rounds 4] [--steps 20]

The 1.1B Llama's projections (in/out 2048/2048, 2048/256, 2048/5632, 5632/2048), r 16, bf16
activations and base weight, float32 adapter factors (``autocast_adapter_dtype``), scaling 2.
``previous``: the node as it was (the factors cast, ``B`` scaled by its own kernel, the scaling
and the gradients' casts as separate kernels), kept here only for this comparison; ``current``:
:class:`~grafting_lora.fused.LoraLinearFunction` (the scaling as each product's ``alpha``, the
gradients written in float32 by their GEMM where the device can). Inference: ``previous`` casts
the factors on every call; ``current`` keeps them (:class:`~grafting_lora.factor_casts.FactorCasts`).
Rounds interleave the two forms in one process; each row gives the medians, the aten ops that
launch a kernel per call (any device) and, on CUDA, the kernels the profiler saw per call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, "benchmarks")
import bound

from grafting_lora.factor_casts import FactorCasts
from grafting_lora.fused import LoraLinearFunction, lora_linear
from grafting_lora.scaled_products import writes_float32

SHAPES = [(2048, 2048), (2048, 256), (2048, 5632), (5632, 2048)]
RANK, SCALING = 16, 2.0


class PreviousLoraLinear(torch.autograd.Function):
    """The node before this round (no dropout, no grouping): kept for the comparison only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, a32: torch.Tensor, b32: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        a, b = a32.to(x.dtype), b32.to(x.dtype)
        low = flat @ a.t()
        y = low @ (b * SCALING).t()
        y.addmm_(flat, weight.t())
        ctx.save_for_backward(flat, weight, a, b, low)
        ctx.dtypes = (a32.dtype, b32.dtype)
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat, weight, a, b, low = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_low = (g @ b).mul_(SCALING)
        grad_x = (grad_low @ a).addmm_(g, weight)
        grad_a = (grad_low.t() @ flat).to(ctx.dtypes[0])
        grad_b = (g.t() @ low).mul_(SCALING).to(ctx.dtypes[1])
        return grad_x, None, grad_a, grad_b


def previous_inference(x: torch.Tensor, weight: torch.Tensor, a32: torch.Tensor, b32: torch.Tensor) -> torch.Tensor:
    a, b = a32.to(x.dtype), b32.to(x.dtype)
    y = (x @ a.t()) @ (b * SCALING).t()
    return y.addmm_(x, weight.t())


def kernels(fn: Callable[[], Any]) -> int:
    """CUDA kernels the profiler records for one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def forms(n_in: int, n_out: int, tokens: int, device: torch.device) -> dict[str, Callable[[], None]]:
    """The four calls timed for one projection shape: training step and no-grad forward, previous and current."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, n_in, generator=gen).to(device, torch.bfloat16).requires_grad_()
    weight = (torch.randn(n_out, n_in, generator=gen) / n_in**0.5).to(device, torch.bfloat16)
    a = (torch.randn(RANK, n_in, generator=gen) / n_in**0.5).to(device).requires_grad_()
    b = (torch.randn(n_out, RANK, generator=gen) / RANK).to(device).requires_grad_()
    upstream = torch.randn(tokens, n_out, generator=gen).to(device, torch.bfloat16)
    casts = FactorCasts()

    def train(node: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            x.grad = a.grad = b.grad = None  # as zero_grad(set_to_none=True): each gradient a fresh tensor
            node().backward(upstream)

        return step

    def infer(forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            with torch.no_grad():
                forward()

        return step

    return {
        "train previous": train(lambda: PreviousLoraLinear.apply(x, weight, a, b)),
        "train current": train(lambda: LoraLinearFunction.apply(x, weight, None, a, b, SCALING, 0.0)),
        "infer previous": infer(lambda: previous_inference(x, weight, a, b)),
        "infer current": infer(lambda: lora_linear(x, weight, None, a, b, SCALING, None, casts)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    run = bound.timer(args.device)
    print(f"{torch.__version__} on {args.device}; float32 products of bf16 (out_dtype): {writes_float32(device)}")
    for n_in, n_out in SHAPES:
        calls = forms(n_in, n_out, args.tokens, device)
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, step in calls.items():
                times[name].append(run(step, args.warmup, args.steps))
        for name, step in calls.items():
            counted = f"aten ops {bound.count_ops(step):3d}"
            if device.type == "cuda":
                counted += f"  kernels {kernels(step):3d}"
            median = statistics.median(times[name])
            rounds = [round(t, 3) for t in times[name]]
            print(f"{n_in:5d}->{n_out:<5d} {name:15s} {median:8.3f} ms  {counted}  rounds {rounds}", flush=True)


if __name__ == "__main__":
    main()
