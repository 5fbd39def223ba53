"""Ops of one routed LoRA layer's training forward and backward, against one adapter's (CPU, no timing).

Usage: python benchmarks/routed_ops.py [--adapters 4] [--rank 16] [--batch 8] [--seq 32]

One ``nn.Linear`` of the tiny preset's MLP (64 -> 176, bf16, frozen) wrapped with LoRA adapters
(float32 weights, the default), the batch's samples routed round-robin over the adapters, against
the same layer with one adapter and no routing (its fused node). Counts, for forward and backward:
the aten ops that do work (what launches kernels on a GPU), the view ops (metadata only), and
the autograd nodes of the layer's graph. On the GPU each working op is at least one launch of a few
microseconds: a layer's count times the 112 adapted projections of the 1.1B shape is what a step adds.
"""

from __future__ import annotations

import argparse
import collections
import contextlib

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from grafting import route_samples
from grafting.model.layer import AdaptedLayer
from grafting_lora.layers import LoraLinear

#: ops that only make a new view or read metadata: no kernel on a GPU
VIEWS = {
    "view",
    "_unsafe_view",
    "t",
    "transpose",
    "permute",
    "expand",
    "slice",
    "select",
    "unsqueeze",
    "squeeze",
    "as_strided",
    "alias",
    "detach",
    "split",
    "split_with_sizes",
    "unbind",
    "reshape",
    "lift_fresh",
    "_reshape_alias",
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
}


class Counter(TorchDispatchMode):
    """Counts the aten ops that reach the backend (after autograd, after composite ops decompose)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def split(self) -> tuple[dict[str, int], dict[str, int]]:
        work = {k: v for k, v in self.ops.items() if k not in VIEWS}
        views = {k: v for k, v in self.ops.items() if k in VIEWS}
        return work, views


def _nodes(y: torch.Tensor) -> int:
    seen, stack = set(), [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return len(seen)


def layer(adapters: int, rank: int) -> AdaptedLayer:
    torch.manual_seed(0)
    base = nn.Linear(64, 176, bias=False).to(torch.bfloat16).requires_grad_(False)
    wrapped = AdaptedLayer(base)
    for k in range(adapters):
        wrapped.add_adapter(f"a{k}", LoraLinear(base, rank, 2.0, init=False))
    wrapped.set_active([f"a{k}" for k in range(adapters)])
    return wrapped


def count(wrapped: AdaptedLayer, x: torch.Tensor, names: list[str] | None) -> dict[str, object]:
    """Op counts of forward and backward of the layer's second call in one routing (the first builds what a
    batch builds once for all layers: the routing's index and masks)."""
    context = route_samples(names) if names is not None else contextlib.nullcontext()
    result: dict[str, object] = {}
    with context:
        for _ in range(2):
            x_in = x.detach().requires_grad_(True)
            forward = Counter()
            with forward:
                y = wrapped(x_in)
            nodes = _nodes(y)
            backward = Counter()
            grad = torch.ones_like(y)
            with backward:
                y.backward(grad)
            wrapped.zero_grad(set_to_none=True)
            result = {"forward": forward.split(), "backward": backward.split(), "nodes": nodes}
    return result


def _show(title: str, result: dict[str, object]) -> None:
    print(title)
    total = 0
    for phase in ("forward", "backward"):
        work, views = result[phase]  # type: ignore[misc]
        n = sum(work.values())
        total += n
        listing = ", ".join(f"{k} {v}" for k, v in sorted(work.items()))
        print(f"  {phase}: {n} working ops ({sum(views.values())} views): {listing}")
    print(f"  autograd nodes: {result['nodes']}; working ops forward+backward: {total}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32)
    args = parser.parse_args()
    x = torch.randn(args.batch, args.seq, 64).to(torch.bfloat16)
    _show("one adapter, no routing (fused node):", count(layer(1, args.rank), x, None))
    names = [f"a{i % args.adapters}" for i in range(args.batch)]
    _show(
        f"{args.adapters} adapters routed per sample:",
        count(layer(args.adapters, args.rank), x, names),
    )
    with_base = [*names[:-1], "__base__"]
    _show(
        f"{args.adapters} adapters routed per sample, the last sample to the base:",
        count(layer(args.adapters, args.rank), x, with_base),
    )


if __name__ == "__main__":
    main()
