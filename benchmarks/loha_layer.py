"""One adapted linear layer in isolation: GPU time and host (CPU) time of forward + backward.

Usage: python benchmarks/loha_layer.py [--tokens 8192] [--iters 50]

For each projection shape of a 1.1B Llama, times the frozen base layer alone
(forward + input gradient), and the base layer with a grafting LoHa adapter on
each evaluation path, a LoHa written as plain autograd ops (the factored
formula, for comparison), and LoRA. GPU time is measured at ``--tokens``
tokens with CUDA events; host time (what the CPU spends issuing the kernels)
with 16 tokens, where the GPU work is negligible. A training step is bound by
whichever is larger summed over the model.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

SHAPES = {"q/o": (2048, 2048), "k/v": (2048, 256), "gate/up": (2048, 5632), "down": (5632, 2048)}


class PlainLoHa(nn.Module):
    """The factored LoHa delta with autograd ops only (the reference the plugin's Function replaces)."""

    def __init__(self, n_in: int, n_out: int, r: int) -> None:
        super().__init__()
        from grafting_loha.hadamard import factored_delta

        self.factored_delta = factored_delta
        self.p = nn.ParameterList([nn.Parameter(torch.randn(s) * 0.1) for s in [(n_out, r), (r, n_in)] * 2])

    def forward(self, base: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        u, v = self.factored_delta(*self.p, 1.0)
        return base(x) + F.linear(F.linear(x, v.to(x.dtype)), u.to(x.dtype))


def variants(n_in: int, n_out: int, r: int, device: str) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    from grafting.layer import AdaptedLayer
    from grafting_loha import LoHaLinear
    from grafting_lora import LoraLinear

    base = nn.Linear(n_in, n_out, bias=False, device=device, dtype=torch.bfloat16).requires_grad_(False)
    out: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"base": base}
    for path in ("auto", "dense", "factored"):
        layer = AdaptedLayer(base)
        adapter = LoHaLinear(base, r, 1.0, init_weights=False).to(device)
        adapter.path = path
        layer.add_adapter("loha", adapter)
        layer.set_active(["loha"])
        out[f"loha-{path}"] = layer
    plain = PlainLoHa(n_in, n_out, r).to(device)
    out["loha-plain-autograd"] = lambda x: plain(base, x)
    lora = AdaptedLayer(base)
    lora.add_adapter("lora", LoraLinear(base, r, 1.0, init=False).to(device))
    lora.set_active(["lora"])
    out["lora"] = lora
    return out


def gpu_ms(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, iters: int) -> float:
    for _ in range(5):
        fn(x).sum().backward()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x).sum().backward()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def host_us(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, iters: int) -> float:
    for _ in range(20):
        fn(x).sum().backward()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(x).sum().backward()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return 1e6 * elapsed / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    import grafting_loha.layers  # noqa: F401  (fail early if the plugin is missing)

    device = "cuda"
    print(f"{'shape':8} {'variant':22} {'GPU ms':>8} {'x base':>7} {'host us':>8}")
    for name, (n_in, n_out) in SHAPES.items():
        fns = variants(n_in, n_out, args.r, device)
        big = torch.randn(args.tokens, n_in, device=device, dtype=torch.bfloat16, requires_grad=True)
        small = torch.randn(16, n_in, device=device, dtype=torch.bfloat16, requires_grad=True)
        base_ms = gpu_ms(fns["base"], big, args.iters)
        for label, fn in fns.items():
            ms = base_ms if label == "base" else gpu_ms(fn, big, args.iters)
            print(f"{name:8} {label:22} {ms:8.3f} {ms / base_ms:7.2f} {host_us(fn, small, 4 * args.iters):8.1f}")


if __name__ == "__main__":
    main()
