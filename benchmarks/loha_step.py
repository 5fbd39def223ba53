"""LoHa training-step time against the frozen-base bound, grafting and PEFT in one run.

Usage: python benchmarks/loha_step.py [--preset 1.1b|tiny] [--modes autocast,bf16,fp32] [--json out.json]

The bound is one forward plus the activation gradients of the model with no
adapter (every base weight frozen, the input embeddings requiring grad). Each
variant wraps the same base model in place (unloaded afterwards), and a step
is forward + backward on the same batch (no optimizer; adapter gradients are
dropped between steps). Times are CUDA-event medians after warm-up; memory is
the peak allocated during the timed steps.

Modes (the model is bf16 in each):
  autocast  adapters in float32 (both libraries' default), step under torch.autocast(bfloat16),
            as a mixed-precision trainer runs it;
  bf16      adapters created in bf16 (autocast_adapter_dtype=False), no autocast;
  fp32      adapters in float32, no autocast: the adapter arithmetic runs in float32.

Before timing, an equivalence check saves a random grafting LoHa adapter,
loads it into PEFT, and compares logits of grafting (auto, dense and factored
paths) and PEFT on one short batch with float32 adapters.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRESETS: dict[str, dict[str, int]] = {
    "1.1b": {"hidden": 2048, "intermediate": 5632, "layers": 22, "heads": 32, "kv_heads": 4, "vocab": 32000},
    "tiny": {"hidden": 64, "intermediate": 176, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 128},
}
VARIANTS = (
    "bound",
    "lora-grafting",
    "lora-peft",
    "loha-grafting",
    "loha-grafting-dense",
    "loha-grafting-factored",
    "loha-grafting-adapter",
    "loha-peft",
)
#: Variant suffixes: force the LoHa evaluation path, or the precision of its products
#: (``adapter``: float32 factors cast the bf16 input up, as PEFT does; ``input``: the default).
SUFFIXES = {
    "dense": ("path", "dense"),
    "factored": ("path", "factored"),
    "input": ("precision", "input"),
    "adapter": ("precision", "adapter"),
    "autograd": ("factored_linear", "autograd"),  # the factored path as plain autograd ops, for comparison
}


def autograd_factored_linear(
    x: torch.Tensor,
    l1: torch.Tensor,
    r1: torch.Tensor,
    l2: torch.Tensor,
    r2: torch.Tensor,
    row_scale: torch.Tensor | float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``grafting_loha.hadamard.factored_linear`` written with autograd ops instead of one Function."""
    from grafting_loha.hadamard import factored_delta

    u, v = factored_delta(l1, r1, l2, r2, row_scale)
    return F.linear(F.linear(x.to(dtype), v.to(dtype)), u.to(dtype))


def grafting_api() -> Any:
    """grafting with the LoRA and LoHa plugins, registered in-process when not installed."""
    import grafting

    known = grafting.get_registry().methods
    if "LORA" not in known:
        import grafting_lora.plugin

        grafting.register_plugin(grafting_lora.plugin)
    if "LOHA" not in known:
        import grafting_loha.plugin

        grafting.register_plugin(grafting_loha.plugin)
    return grafting


def build_base(shape: dict[str, int], device: str) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=4096,
    )
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.requires_grad_(False)
    return model.train()


def adapter_config(lib: str, method: str, r: int) -> Any:
    mod: Any
    if lib == "peft":
        import peft

        mod = peft
    else:
        mod = grafting_api()
    if method == "lora":
        return mod.LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS, init_lora_weights=False)
    return mod.LoHaConfig(r=r, alpha=r, target_modules=TARGETS, init_weights=False)


@contextlib.contextmanager
def wrapped(base: nn.Module, variant: str, r: int, adapter_dtype_fp32: bool) -> Iterator[nn.Module]:
    """The base model with the variant's adapter; unloaded (base restored) on exit."""
    if variant == "bound":
        yield base
        return
    method, lib = variant.split("-")[:2]
    config = adapter_config(lib, method, r)
    if lib == "peft":
        import peft

        model = peft.get_peft_model(base, config, autocast_adapter_dtype=adapter_dtype_fp32)
    else:
        model = grafting_api().get_peft_model(base, config, autocast_adapter_dtype=adapter_dtype_fp32)
    import grafting_loha.layers as loha_layers
    from grafting_loha import LoHaAdapter

    attr, value = SUFFIXES[variant.split("-")[2]] if variant.count("-") == 2 else ("path", "auto")
    owner: Any = loha_layers if attr == "factored_linear" else LoHaAdapter
    default = getattr(owner, attr)
    setattr(owner, attr, autograd_factored_linear if attr == "factored_linear" else value)
    try:
        model.train()
        yield model
    finally:
        setattr(owner, attr, default)
        model.unload()
        base.requires_grad_(False)


def time_steps(
    step: Callable[[], None], warmup: int, steps: int, device: str
) -> tuple[list[float], list[float], float]:
    """Per-step milliseconds (CUDA events on a GPU), host milliseconds to issue each step, peak MiB.

    A host time close to the step time means the step is bound by the CPU issuing kernels.
    """
    for _ in range(warmup):
        step()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, host = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            host.append(1000 * (time.perf_counter() - t0))
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            step()
            host.append(1000 * (time.perf_counter() - t0))
            times.append(host[-1])
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    return times, host, peak


def make_step(model: nn.Module, embeds: torch.Tensor, labels: torch.Tensor, autocast: bool) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    device_type = embeds.device.type

    def step() -> None:
        ctx = torch.autocast(device_type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            loss = model(inputs_embeds=embeds, labels=labels).loss
        loss.backward()
        embeds.grad = None
        for p in params:
            p.grad = None

    return step


def profile(step: Callable[[], None], steps: int, label: str, out_dir: str | None) -> str:
    """Self device time per op over ``steps`` profiled steps: a short summary, the full table to ``out_dir``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()

    def device_us(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0))

    busy = sum(device_us(e) for e in events) / steps / 1000
    top = sorted(events, key=device_us, reverse=True)[:14]
    lines = [f"-- profile {label}: device busy {busy:.1f} ms/step"]
    lines += [f"   {device_us(e) / steps / 1000:7.2f} ms {e.count // steps:5d}x  {e.key[:70]}" for e in top]
    if out_dir:
        with open(f"{out_dir}/profile_{label.replace(':', '_')}.txt", "w") as fh:
            fh.write(events.table(sort_by="self_cuda_time_total", row_limit=60))
    return "\n".join(lines)


def equivalence(base: nn.Module, r: int, device: str, vocab: int) -> dict[str, float]:
    """Relative logit differences: grafting auto/dense/factored vs each other and vs PEFT loading its file.

    The base runs in float32 for the check (bf16 -> float32 -> bf16 is exact), so the
    differences show the adapters' arithmetic, not bf16 rounding amplified over the layers.
    """
    base.float()
    try:
        return _equivalence(base, r, device, vocab)
    finally:
        base.to(torch.bfloat16)
        base.train()


def _equivalence(base: nn.Module, r: int, device: str, vocab: int) -> dict[str, float]:
    import peft

    from grafting_loha import LoHaAdapter

    ids = torch.randint(0, vocab, (1, 256), device=device, generator=torch.Generator(device).manual_seed(1))
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad(), tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(2)
        model = grafting_api().get_peft_model(base, adapter_config("grafting", "loha", r))
        model.eval()
        for path in ("auto", "dense", "factored"):
            LoHaAdapter.path = path
            out[path] = model(input_ids=ids).logits.float()
        LoHaAdapter.path = "auto"
        model.save_pretrained(folder)
        model.unload()
        theirs = peft.PeftModel.from_pretrained(base, folder)
        theirs.eval()
        out["peft"] = theirs(input_ids=ids).logits.float()
        theirs.unload()
        out["base"] = base(input_ids=ids).logits.float()

    def rel(a: str, b: str) -> float:
        return float((out[a] - out[b]).norm() / out[b].norm())

    return {
        "adapter_effect": rel("auto", "base"),
        "factored_vs_dense": rel("factored", "dense"),
        "auto_vs_peft": rel("auto", "peft"),
        "dense_vs_peft": rel("dense", "peft"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="1.1b", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--modes", default="autocast,bf16,fp32")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-check", action="store_true", help="skip the equivalence check")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--profile", default="", help="mode:variant,... to profile on a GPU after timing")
    parser.add_argument("--profile-dir", default=None, help="write full profiler tables here")
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after building the model")
    args = parser.parse_args()

    shape = PRESETS[args.preset]
    base = build_base(shape, args.device)
    check = {} if args.no_check else equivalence(base, args.r, args.device, shape["vocab"])
    ids = torch.randint(0, shape["vocab"], (args.batch, args.seq), device=args.device)
    with torch.no_grad():
        embeds = base.get_input_embeddings()(ids).detach()
    embeds.requires_grad_(True)
    if args.gc_freeze:
        gc.collect()
        gc.freeze()

    rows: list[dict[str, Any]] = []
    profiles: list[str] = []
    for mode in args.modes.split(","):
        bound_ms: float | None = None
        order = ["bound", *[v for v in args.variants.split(",") if v != "bound"], "bound"]
        for i, variant in enumerate(order):
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            with wrapped(base, variant, args.r, adapter_dtype_fp32=mode != "bf16") as model:
                step = make_step(model, embeds, ids, autocast=mode == "autocast")
                times, host, peak = time_steps(step, args.warmup, args.steps, args.device)
                if f"{mode}:{variant}" in args.profile.split(",") and args.device.startswith("cuda"):
                    profiles.append(profile(step, 2, f"{mode}:{variant}", args.profile_dir))
            ms = statistics.median(times)
            if variant == "bound" and bound_ms is None:
                bound_ms = ms
            assert bound_ms is not None
            row = {
                "mode": mode,
                "variant": "bound-again" if i == len(order) - 1 else variant,
                "ms": ms,
                "ms_min": min(times),
                "ms_max": max(times),
                "ratio": ms / bound_ms,
                "host_ms": statistics.median(host),
                "peak_mib": peak,
            }
            rows.append(row)
            print(
                f"{mode:9} {row['variant']:22} {ms:8.1f} ms (min {min(times):6.1f}) x{ms / bound_ms:5.2f}"
                f"  host {row['host_ms']:6.1f} ms  peak {peak:6.0f} MiB",
                flush=True,
            )

    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(
        f"\nLlama-shaped {shape}, batch {args.batch}x{args.seq}, bf16 model, r={args.r} on {len(TARGETS)} projections;"
        f" {gpu}; median of {args.steps} steps after {args.warmup} warm-up (forward + backward, no optimizer)"
    )
    for text in profiles:
        print(text)
    if check:
        print("equivalence (relative L2 of logits): " + ", ".join(f"{k}={v:.2e}" for k, v in check.items()))
    print(f"{'mode':9} {'variant':22} {'ms/step':>8} {'min':>7} {'x bound':>8} {'host ms':>8} {'peak MiB':>9}")
    for row in rows:
        print(
            f"{row['mode']:9} {row['variant']:22} {row['ms']:8.1f} {row['ms_min']:7.1f} {row['ratio']:8.2f}"
            f" {row['host_ms']:8.1f} {row['peak_mib']:9.0f}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "shape": shape, "device": gpu, "check": check, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
