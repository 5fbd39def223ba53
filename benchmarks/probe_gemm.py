"""GPU probe: what one LoRA layer's pieces cost at the 1.1B shapes, each form against the frozen base's own product.

Usage: python benchmarks/probe_gemm.py. For each projection shape (tokens 8192, r 16, bf16 activations,
float32 adapter weights) it times, as medians of interleaved rounds over rotating input sets:

* forward: the base product alone (what the bound runs); the skinny product first with the base
  accumulated onto it (``addmm_``, grafting's order); the base first with the skinny product added
  (``addmm_`` of rank r, reading and writing the output);
* backward input gradient: ``g·W`` alone; the skinny first with ``g·W`` accumulated; ``g·W`` first with
  the skinny added;
* the adapter's gradients: matmul then cast to float32, against ``mm(..., out_dtype=float32)`` where the
  installed torch has it;
* the casts of A and B;

and AdamW over the 224 adapter tensors of the 1.1B model (foreach against fused).
"""

from __future__ import annotations

import statistics

import torch

TOKENS, R = 8192, 16
SHAPES = {"q/o (2048->2048)": (2048, 2048), "k/v (2048->256)": (2048, 256), "gate/up (2048->5632)": (2048, 5632)}
SHAPES["down (5632->2048)"] = (5632, 2048)
SETS = 4  # rotating input sets: no timing of a cache-resident operand


def timed(fns: dict[str, object], rounds: int = 7, reps: int = 20) -> dict[str, float]:
    """Median microseconds per call of each function, rounds interleaved."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        for i in range(3):
            fn(i)  # type: ignore[operator]
    torch.cuda.synchronize()
    for _ in range(rounds):
        for name, fn in fns.items():
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for i in range(reps):
                fn(i)  # type: ignore[operator]
            end.record()
            torch.cuda.synchronize()
            times[name].append(1000 * begin.elapsed_time(end) / reps)
    return {name: statistics.median(t) for name, t in times.items()}


def layer_probe(k: int, n: int) -> dict[str, float]:
    dev, bf = "cuda", torch.bfloat16
    xs = [torch.randn(TOKENS, k, device=dev, dtype=bf) for _ in range(SETS)]
    gs = [torch.randn(TOKENS, n, device=dev, dtype=bf) for _ in range(SETS)]
    w = torch.randn(n, k, device=dev, dtype=bf) / k**0.5
    a32 = torch.randn(R, k, device=dev) / k**0.5
    b32 = torch.randn(n, R, device=dev)
    a, b = a32.to(bf), b32.to(bf)
    lows = [x @ a.t() for x in xs]
    glows = [g @ b for g in gs]
    has_out_dtype = True
    try:
        torch.mm(glows[0].t(), xs[0], out_dtype=torch.float32)
    except (RuntimeError, TypeError):
        has_out_dtype = False
    fns = {
        "fwd base only": lambda i: xs[i % SETS] @ w.t(),
        "fwd skinny then addmm_ base": lambda i: (lows[i % SETS] @ b.t()).addmm_(xs[i % SETS], w.t()),
        "fwd base then addmm_ skinny": lambda i: (xs[i % SETS] @ w.t()).addmm_(lows[i % SETS], b.t()),
        "fwd x@A^T": lambda i: xs[i % SETS] @ a.t(),
        "bwd g@W only": lambda i: gs[i % SETS] @ w,
        "bwd skinny then addmm_ g@W": lambda i: (glows[i % SETS] @ a).addmm_(gs[i % SETS], w),
        "bwd g@W then addmm_ skinny": lambda i: (gs[i % SETS] @ w).addmm_(glows[i % SETS], a),
        "bwd g@B": lambda i: gs[i % SETS] @ b,
        "bwd gradA mm+cast": lambda i: (glows[i % SETS].t() @ xs[i % SETS]).float(),
        "bwd gradB mm+cast": lambda i: (gs[i % SETS].t() @ lows[i % SETS]).float(),
        "cast A and B": lambda i: (a32.to(bf), b32.to(bf)),
    }
    if has_out_dtype:
        fns["bwd gradA mm out_dtype"] = lambda i: torch.mm(glows[i % SETS].t(), xs[i % SETS], out_dtype=torch.float32)
        fns["bwd gradB mm out_dtype"] = lambda i: torch.mm(gs[i % SETS].t(), lows[i % SETS], out_dtype=torch.float32)
    return timed(fns)


def adamw_probe() -> dict[str, float]:
    """AdamW over the 1.1B preset's 224 float32 adapter tensors (16 layers x 7 projections x A, B)."""
    shapes = []
    for _ in range(16):
        for k, n in [(2048, 2048), (2048, 256), (2048, 256), (2048, 2048), (2048, 5632), (2048, 5632), (5632, 2048)]:
            shapes += [(R, k), (n, R)]
    out = {}
    for name, options in {"adamw foreach": {"foreach": True}, "adamw fused": {"fused": True}}.items():
        params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW(params, lr=1e-5, **options)
        out[name] = timed({name: lambda i, opt=opt: opt.step()}, rounds=5, reps=10)[name]
    return out


def main() -> None:
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    for label, (k, n) in SHAPES.items():
        print(f"--- {label}: tokens {TOKENS}, r {R}", flush=True)
        for name, us in layer_probe(k, n).items():
            print(f"  {name:32} {us:9.1f} us", flush=True)
    for name, us in adamw_probe().items():
        print(f"  {name:32} {us:9.1f} us per step (224 tensors)", flush=True)


if __name__ == "__main__":
    main()
