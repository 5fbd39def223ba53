"""One DoRA layer's forward + backward at the 1.1B Llama's shapes (GPU): DoRA's Triton kernels against the torch ops.

Usage: python benchmarks/dora_node.py [--tokens 8192] [--rank 16] [--rounds 5] [--device cpu: a smoke run]

For each projection shape of the 1.1B Llama (q/o 2048->2048, k/v 2048->256, gate/up 2048->5632,
down 5632->2048), 8192 tokens, bf16 input and weight, float32 A, B and magnitude, r 16:
``DoraLinearFunction`` with the torch ops (``old``: ``dora_kernels.USE_TRITON = False``, the ops
of before the kernels) and with the Triton kernels (``new``), in interleaved rounds; ``bound`` is
the frozen base layer alone (forward and the input's gradient), what the layer costs without an
adapter. Both backward forms of the new path are timed too (``WEIGHT_SIDE_ABOVE`` 0 / inf) to
tune the shape rule. Before timing, the new path's output and gradients are checked against the
old one's (``grafting.testing.assert_close``): the kernels only ran interpreted on CPUs before.
Prints median and fastest ms per variant and the CUDA kernels each launches per step.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import statistics
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from grafting.testing import assert_close
from grafting_lora import dora_kernels, dora_node
from grafting_lora.dora_node import DoraLinearFunction

SHAPES = {"q/o": (2048, 2048), "k/v": (2048, 256), "gate/up": (2048, 5632), "down": (5632, 2048)}
SCALING = 2.0


def layer_inputs(n_in: int, n_out: int, tokens: int, rank: int, device: str) -> dict[str, torch.Tensor]:
    """A frozen bf16 layer, float32 factors (B not zero: the adapter trained a while) and magnitude, an input."""
    g = torch.Generator(device=device).manual_seed(0)
    weight = (torch.randn(n_out, n_in, device=device, generator=g) / n_in**0.5).bfloat16()
    a = (torch.randn(rank, n_in, device=device, generator=g) / n_in**0.5).requires_grad_(True)
    b = (torch.randn(n_out, rank, device=device, generator=g) * 0.01).requires_grad_(True)
    sq = torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square()
    m = (sq.sqrt() * (1 + 0.1 * torch.rand(n_out, device=device, generator=g))).requires_grad_(True)
    x = torch.randn(tokens, n_in, device=device, generator=g).bfloat16().requires_grad_(True)
    upstream = torch.randn(tokens, n_out, device=device, generator=g).bfloat16()
    return {"x": x, "w": weight, "a": a, "b": b, "m": m, "sq": sq, "up": upstream}


def dora_step(t: dict[str, torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        y = DoraLinearFunction.apply(t["x"], t["w"], None, t["a"], t["b"], t["m"], t["sq"], SCALING, 0.0)
        y.backward(t["up"])

    return step


def bound_step(t: dict[str, torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        F.linear(t["x"], t["w"]).backward(t["up"])

    return step


def results(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Output and gradients (x, A, B, m) of one step, the gradients cleared after."""
    y = DoraLinearFunction.apply(t["x"], t["w"], None, t["a"], t["b"], t["m"], t["sq"], SCALING, 0.0)
    y.backward(t["up"])
    out = (y.detach(), *(t[k].grad.clone() for k in ("x", "a", "b", "m")))
    for k in ("x", "a", "b", "m"):
        t[k].grad = None
    return out


def check(got: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...], msg: str) -> None:
    """Within a few bf16 roundings: 8 relative to the entry, 4 relative to the largest entry
    (the two backward forms round differently; entries that cancel get the largest entry's slack)."""
    for i, (a, e) in enumerate(zip(got, ref, strict=True)):
        eps = torch.finfo(torch.bfloat16).eps  # every product is computed in bf16
        assert_close(a, e, rtol=8 * eps, atol=4 * eps * e.abs().max().item(), msg=f"{msg} [{i}]")


def time_ms(step: Callable[[], None], warmup: int = 3, reps: int = 20) -> float:
    for _ in range(warmup):
        step()
    if not torch.cuda.is_available():  # a smoke run on the CPU
        began = time.perf_counter()
        step()
        return (time.perf_counter() - began) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def kernels_per_step(step: Callable[[], None]) -> int:
    """CUDA kernels (and memsets/copies) one step launches, from the profiler (-1 without CUDA)."""
    if not torch.cuda.is_available():
        return -1
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


VARIANTS: dict[str, tuple[bool, float | None]] = {  # USE_TRITON, WEIGHT_SIDE_ABOVE (None: the shape rule)
    "old": (False, None),
    "new": (True, None),
    "new grad-side": (True, float("inf")),
    "new weight-side": (True, 0.0),
}


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """The module settings of variant ``name``, restored after."""
    use, side = VARIANTS[name]
    kept = dora_kernels.USE_TRITON, dora_node.WEIGHT_SIDE_ABOVE
    dora_kernels.USE_TRITON = use
    if side is not None:
        dora_node.WEIGHT_SIDE_ABOVE = side
    try:
        yield
    finally:
        dora_kernels.USE_TRITON, dora_node.WEIGHT_SIDE_ABOVE = kept


#: Each projection's count in one transformer block.
PER_BLOCK = {"q/o": 2, "k/v": 2, "gate/up": 2, "down": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = args.device
    name = torch.cuda.get_device_name() if device == "cuda" else device
    print(f"{name}  torch {torch.__version__}  triton {importlib.metadata.version('triton')}")
    print(f"tokens {args.tokens}, r {args.rank}, bf16 layer, float32 A/B/m; ms per forward+backward")
    totals: dict[str, float] = {}
    for label, (n_in, n_out) in SHAPES.items():
        t = layer_inputs(n_in, n_out, args.tokens, args.rank, device)
        with variant("old"):
            ref = results(t)
        for name in ("new", "new grad-side", "new weight-side"):
            with variant(name):
                check(results(t), ref, f"{label} {name} against old")
        step = dora_step(t)
        times: dict[str, list[float]] = {"bound": [], **{v: [] for v in VARIANTS}}
        for _ in range(args.rounds):
            times["bound"].append(time_ms(bound_step(t)))
            for name in VARIANTS:
                with variant(name):
                    times[name].append(time_ms(step))
        launches = {"bound": kernels_per_step(bound_step(t))}
        for name in VARIANTS:
            with variant(name):
                launches[name] = kernels_per_step(step)
        b = statistics.median(times["bound"])
        for name, ts in times.items():
            med = statistics.median(ts)
            totals[name] = totals.get(name, 0.0) + PER_BLOCK[label] * med
            print(
                f"{label:8s} {n_in:5d}->{n_out:<5d} {name:16s} median {med:7.3f} ms  fastest {min(ts):7.3f}"
                f"  {med / b:5.2f}x bound  kernels {launches[name]}"
            )
    print("one transformer block (q, k, v, o, gate, up, down):")
    for name, total in totals.items():
        print(f"  {name:16s} {total:8.3f} ms  {total / totals['bound']:5.2f}x bound")


if __name__ == "__main__":
    main()
