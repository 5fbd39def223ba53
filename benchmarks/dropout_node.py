"""One LoRA layer with dropout, forward + backward: the torch node against the Triton node (GPU).

Usage: python benchmarks/dropout_node.py [--tokens 8192] [--rank 16] [--p 0.05] [--profile]

For each (in, out) of a 1.1B Llama's projections, a bf16 frozen base, float32 A and B and an
input that needs its gradient (as after a norm): ``LoraLinearFunction`` (``native_dropout``:
the dropped input and a bool mask written and kept, the adapter's input gradient masked in a
further pass) against ``LoraDropoutFunction`` (the mask drawn in registers in both kernels,
nothing (tokens, in) of its own written or kept), timed in interleaved rounds in one process
(CUDA events, median). Before timing, the Triton node's output and gradients are checked
against the torch node's formula with the kernels' own mask (norm-relative error in the
dtype's eps). Also printed: the memory each keeps for backward and the activation-sized bytes
the adapter's path moves per call (the base's own traffic, the same on both, left out).

On the CPU (``--device cpu``, with ``TRITON_INTERPRET=1`` set and ``--dtype float16``: the
interpreter mishandles bfloat16) it runs as a smoke test on small shapes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bound

from grafting_lora.dropout_kernels import LoraDropoutFunction, draw_seed, keep_mask, keep_rule
from grafting_lora.fused import LoraLinearFunction, lora_products

SHAPES = [(2048, 2048), (2048, 256), (2048, 5632), (5632, 2048)]  # (in, out): q/o, k/v, gate/up, down

Layer = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def build(tokens: int, k: int, out: int, r: int, dtype: torch.dtype, device: str) -> Layer:
    gen = torch.Generator(device=device).manual_seed(k + out)
    x = torch.randn(tokens, k, device=device, dtype=dtype, generator=gen).requires_grad_(True)
    weight = (torch.randn(out, k, device=device, generator=gen) / k**0.5).to(dtype)
    a = (torch.randn(r, k, device=device, generator=gen) / k**0.5).requires_grad_(True)
    b = (torch.randn(out, r, device=device, generator=gen) * 0.1).requires_grad_(True)
    upstream = torch.randn(tokens, out, device=device, dtype=dtype, generator=gen)
    return x, weight, a, b, upstream


def step(node: str, layer: Layer, p: float, scaling: float) -> Callable[[], None]:
    x, weight, a, b, upstream = layer

    def run() -> None:
        if node == "torch":
            y = LoraLinearFunction.apply(x, weight, None, a, b, scaling, p)
        else:
            y = LoraDropoutFunction.apply(x, weight, None, a, b, scaling, p)
        torch.autograd.backward(y, upstream)
        x.grad = a.grad = b.grad = None

    return run


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def check(layer: Layer, p: float, scaling: float) -> float:
    """Largest norm-relative error of output and x/A/B gradients against the torch formula with the kernels' mask."""
    x, weight, a, b, upstream = layer
    leaves = (x, a, b)
    torch.manual_seed(123)
    y = LoraDropoutFunction.apply(x, weight, None, a, b, scaling, p)
    grads = torch.autograd.grad(y, leaves, upstream)
    torch.manual_seed(123)
    seed, offset = draw_seed(x.device)
    keep = keep_mask(x.shape[0], x.shape[1], p, seed, offset, x.device)
    h = torch.ops.aten.native_dropout_backward(x, keep, keep_rule(p)[1])
    y_ref, _ = lora_products(x, h, weight, None, a.to(x.dtype), b.to(x.dtype), scaling)
    grads_ref = torch.autograd.grad(y_ref, leaves, upstream)
    kept = keep.float().mean().item()
    assert abs(kept - (1 - p)) < 0.01, f"keep rate {kept:.4f}, expected {1 - p}"
    errors = [relative(y, y_ref)] + [relative(g, e) for g, e in zip(grads, grads_ref, strict=True)]
    worst = max(errors)
    bound = 4 * torch.finfo(x.dtype).eps
    assert worst <= bound, f"errors {errors} above {bound}"
    return worst


def saved_mib(node: str, layer: Layer, p: float, scaling: float) -> float:
    """Memory the node keeps for backward beyond its inputs (MiB), read from the allocator."""
    x, weight, a, b, _ = layer
    if not x.is_cuda:
        return float("nan")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    fn = LoraLinearFunction if node == "torch" else LoraDropoutFunction
    y = fn.apply(x, weight, None, a, b, scaling, p)
    kept = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()
    del y
    return kept / 2**20


def profile(fn: Callable[[], None], label: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    print(f"--- {label} (3 calls)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--p", type=float, default=0.05)
    parser.add_argument("--scaling", type=float, default=2.0)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--shapes", default=",".join(f"{k}x{o}" for k, o in SHAPES), help="in x out, comma separated")
    parser.add_argument("--profile", action="store_true", help="a torch.profiler table per node and shape")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    run = bound.timer(args.device)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    print(f"tokens {args.tokens}, r {args.rank}, p {args.p}, {args.dtype}, float32 A/B, device {args.device}")
    if args.device.startswith("cuda"):
        print(torch.cuda.get_device_name())
    totals = {"torch": 0.0, "triton": 0.0}
    for k, out in shapes:
        layer = build(args.tokens, k, out, args.rank, dtype, args.device)
        worst = check(layer, args.p, args.scaling)
        times: dict[str, list[float]] = {"torch": [], "triton": []}
        for node in times:  # warm-up (Triton's autotuning) outside the rounds
            step(node, layer, args.p, args.scaling)()
        for _ in range(args.rounds):
            for node in times:
                times[node].append(run(step(node, layer, args.p, args.scaling), 1, args.steps))
        t, f = statistics.median(times["torch"]), statistics.median(times["triton"])
        totals["torch"] += t
        totals["triton"] += f
        kept = {node: saved_mib(node, layer, args.p, args.scaling) for node in times}
        elements = args.tokens * k
        print(
            f"{k:5d}->{out:<5d} torch {t:8.3f} ms  triton {f:8.3f} ms  ({t / f:.2f}x)"
            f"  kept for backward torch {kept['torch']:.1f} MiB, triton {kept['triton']:.1f} MiB"
            f"  adapter-path activation bytes/call torch {16 * elements / 2**20:.0f} MiB,"
            f" triton {6 * elements / 2**20:.0f} MiB  max rel. error {worst:.1e}",
            flush=True,
        )
        if args.profile and args.device.startswith("cuda"):
            for node in times:
                profile(step(node, layer, args.p, args.scaling), f"{node} {k}->{out}")
        del layer
    print(f"sum over shapes: torch {totals['torch']:.3f} ms, triton {totals['triton']:.3f} ms")


if __name__ == "__main__":
    main()
