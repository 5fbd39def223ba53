"""Every layer method against the hardware bound, grafting beside PEFT, eager and compiled, in one run.

Usage: python benchmarks/bound.py [--preset 1b|8b|tiny] [--part eager|compile] [--json out.json] [--ops]
[--rounds 3] [--profile bound,lora:grafting] [--saved]
[--compile-mode max-autotune-no-cudagraphs] (compiled LoRA's forms: --methods lora,lora-node,lora-op)
(also `nox -s bench -- --bound ...`).

The bound is the frozen base model's training forward plus its activation
gradients (no adapter, no optimizer): what any adapter's step must at least do.
A step of a variant is forward, backward and AdamW over the adapter weights;
each figure is its CUDA-event median over ``--steps`` steps after warm-up,
reported as a ratio to the bound measured in the same round (the compiled bound
for compiled variants). A run is ``--rounds`` alternating rounds: the bound, then
every variant (rebuilt each round, the order rotated a place each round so that
none is always measured first); each figure is reported as its median over rounds,
its fastest round (the lowest ratio) and the spread of its ratios. Inference
figures are no-grad forwards against the base's forward; the routed figure is
four adapters routed per sample against one adapter of the same round. Peak memory is what a step allocates above what is resident. ``--ops`` adds each
eager step's count of kernel-launching aten ops (the host's work; the same on CPU and GPU).
``lora-ungrouped`` (and ``lora-bf16-ungrouped``) is the ``lora`` row with grafting's shared-input
grouping off (q/k/v's and gate/up's A products one per layer); ``--no-grouping`` turns it off for
every variant. ``--profile`` (``bound``, ``method:lib``; once, in the first round) prints a step's top
kernels, its launches and ms per category (GEMM, casts/copies, dropout, optimizer, ...; see
``kernel_categories.py``) beside the bound's, and its host wall against its kernel time
(``method:lib:inference`` profiles the no-grad forward beside the base forward's, ``lora:grafting:routed``
the routed training step beside one adapter's); on the CPU the
"kernels" are the aten ops. ``--saved`` adds the bytes autograd saves for backward in one step (each
storage once; ``saved_activation_mib`` leaves out the parameters and the input): the bound's and each
variant's, what the peak-memory row is mostly made of.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import gc
import json
import math
import signal
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import kernel_categories
import torch
from torch import nn

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRESETS: dict[str, dict[str, int]] = {
    "1b": {"hidden": 2048, "intermediate": 5632, "layers": 16, "heads": 32, "kv": 4, "batch": 8, "seq": 1024},
    "8b": {"hidden": 4096, "intermediate": 14336, "layers": 32, "heads": 32, "kv": 8, "batch": 4, "seq": 1024},
    "tiny": {"hidden": 64, "intermediate": 176, "layers": 2, "heads": 4, "kv": 2, "batch": 2, "seq": 32},
    # Qwen3-MoE: 64 experts, top-8, expert width 768 (the `lora-moe` variant adapts the expert tensors)
    "moe": {"hidden": 2048, "intermediate": 768, "layers": 12, "heads": 32, "kv": 4, "batch": 4, "seq": 1024},
    "moe-tiny": {"hidden": 64, "intermediate": 32, "layers": 2, "heads": 4, "kv": 2, "batch": 2, "seq": 32},
}
EXPERTS, TOP_K = 64, 8
#: grafting-only LoRA variants: ``LoraLinear.compiled_form`` under torch.compile (eager: the default layer)
#: -- "node" the autograd Function traced into the graph, "op" the custom op grafting_lora::lora_linear.
COMPILED_FORMS = {"lora-node": "node", "lora-op": "op"}
VOCAB = 32000


def libraries() -> dict[str, Any]:
    """grafting (its plugins registered in-process when not installed) and PEFT."""
    import peft

    import grafting

    known = grafting.get_registry().methods
    plugins = ["lora", "ia3", "loha", "prefix", "lokr", "oft", "boft", "adalora", "ln_tuning"]
    if not known:  # run from a source tree without installing: register every plugin found on the path
        for name in plugins:
            with contextlib.suppress(ImportError):
                grafting.register_plugin(__import__(f"grafting_{name}.plugin", fromlist=["plugin"]))
    return {"grafting": grafting, "peft": peft}


def config(lib: Any, method: str, r: int) -> tuple[Any, dict[str, Any]]:
    """The config for ``method`` in ``lib``'s spelling, and get_peft_model options."""
    lora = {"r": r, "lora_alpha": 2 * r, "target_modules": TARGETS, "init_lora_weights": False}
    if method == "lora":
        return lib.LoraConfig(**lora), {}
    if method == "lora-bf16":
        return lib.LoraConfig(**lora), {"autocast_adapter_dtype": False}
    if method == "lora-ungrouped":  # grafting only: shared-input grouping off (see ungrouped)
        return lib.LoraConfig(**lora), {}
    if method == "lora-bf16-ungrouped":
        return lib.LoraConfig(**lora), {"autocast_adapter_dtype": False}
    if method == "lora-exact":  # grafting only: PEFT's float32 adapter arithmetic
        return lib.LoraConfig(**lora, precision="adapter"), {}
    if method in COMPILED_FORMS:  # grafting only: LoRA's layer in another form under torch.compile (see wrap)
        return lib.LoraConfig(**lora), {}
    if method == "lora-dropout":
        return lib.LoraConfig(**lora, lora_dropout=0.05), {}
    if method in ("dora", "dora-wside", "dora-gside"):  # the last two: grafting's backward forms (DORA_SIDES)
        return lib.LoraConfig(**lora, use_dora=True), {}
    if method == "dora-dropout":
        return lib.LoraConfig(**lora, use_dora=True, lora_dropout=0.05), {}
    if method == "ia3":
        cfg = lib.IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
        )
        return cfg, {}
    if method == "prefix":
        return lib.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=30), {}
    if method == "lora-moe":  # attention projections plus every layer's 3-D expert tensors (target_parameters)
        return lib.LoraConfig(
            **{**lora, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        ), {}
    if method == "loha":
        return lib.LoHaConfig(r=r, alpha=2 * r, target_modules=TARGETS, init_weights=False), {}
    if method == "oft":  # block size 32 (issue 22's figure), PEFT's default Cayley-Neumann series
        return lib.OFTConfig(r=0, oft_block_size=32, target_modules=TARGETS, init_weights=False), {}
    if method == "boft":  # block size 32, 2 butterfly factors (PEFT needs its CUDA extension for more than 1)
        cfg = lib.BOFTConfig(boft_block_size=32, boft_n_butterfly_factor=2, target_modules=TARGETS, init_weights=False)
        return cfg, {}
    if method == "lokr":
        return lib.LoKrConfig(r=r, alpha=2 * r, target_modules=TARGETS, init_weights=False), {}
    if method == "ln_tuning":  # every RMSNorm of the model (PEFT's default targets for Llama)
        return lib.LNTuningConfig(), {}
    if method == "adalora":  # init_r 16; the step includes the orthogonality term (CAUSAL_LM in both libraries)
        cfg = lib.AdaLoraConfig(
            init_r=r,
            target_r=max(1, r // 2),
            lora_alpha=2 * r,
            total_step=1000,
            target_modules=TARGETS,
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
        return cfg, {}
    raise ValueError(method)


#: grafting only: DoRA's backward with ``s`` always on the weight rows / always on the gradient
#: (``grafting_lora.dora_node.WEIGHT_SIDE_ABOVE``; ``dora`` uses the shape rule)
DORA_SIDES = {"dora-wside": 0.0, "dora-gside": float("inf")}


@contextlib.contextmanager
def variant_settings(method: str) -> Any:
    """Module settings a variant runs under, restored after it."""
    if method not in DORA_SIDES:
        yield
        return
    from grafting_lora import dora_node

    kept = dora_node.WEIGHT_SIDE_ABOVE
    dora_node.WEIGHT_SIDE_ABOVE = DORA_SIDES[method]
    try:
        yield
    finally:
        dora_node.WEIGHT_SIDE_ABOVE = kept


def build_base(shape: dict[str, int], device: str, moe: bool = False) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    if moe:
        moe_cfg = Qwen3MoeConfig(
            vocab_size=VOCAB,
            hidden_size=shape["hidden"],
            moe_intermediate_size=shape["intermediate"],
            num_hidden_layers=shape["layers"],
            num_attention_heads=shape["heads"],
            num_key_value_heads=shape["kv"],
            num_experts=EXPERTS if shape["hidden"] > 256 else 8,
            num_experts_per_tok=TOP_K if shape["hidden"] > 256 else 2,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            max_position_embeddings=4096,
        )
        with torch.device(device):
            return Qwen3MoeForCausalLM(moe_cfg).to(torch.bfloat16).requires_grad_(False)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv"],
        max_position_embeddings=4096,
    )
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model.requires_grad_(False)


def embeds_need_grad(model: nn.Module, compiled: bool = False) -> None:
    """The bound: activation gradients all the way down, as an adapter on the first layer needs.

    Compiled, ``requires_grad_`` inside the traced forward breaks the graph (3 graphs on torch 2.13):
    the embeddings' output gets a trained zero added instead (one pass over the embeddings), one graph.
    """
    embeddings = model.get_input_embeddings()
    if not compiled:
        embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_(True))
        return
    embeddings.bound_zero = nn.Parameter(
        torch.zeros((), dtype=embeddings.weight.dtype, device=embeddings.weight.device)
    )
    embeddings.register_forward_hook(lambda m, a, out: out + m.bound_zero)


def timer(device: str) -> Callable[[Callable[[], Any], int, int], float]:
    def run(fn: Callable[[], Any], warmup: int, steps: int) -> float:
        for _ in range(warmup):
            fn()
        if not device.startswith("cuda"):
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                fn()
                times.append(1000 * (time.perf_counter() - start))
            return statistics.median(times)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for begin, end in events:
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(b.elapsed_time(e) for b, e in events)

    return run


def peak_mib(fn: Callable[[], Any], device: str) -> float:
    if not device.startswith("cuda"):
        return float("nan")
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - resident) / 2**20


def train_step(model: nn.Module, ids: torch.Tensor, params: list[torch.nn.Parameter]) -> Callable[[], None]:
    opt = torch.optim.AdamW(params, lr=1e-5) if params else None

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def infer(model: nn.Module, ids: torch.Tensor, **kwargs: Any) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            model(input_ids=ids, **kwargs)

    return step


#: grafting-only variants of the LoRA rows: the same config with shared-input grouping off, for the
#: side-by-side figure of grouped (``lora``) against ungrouped q/k/v and gate/up products
UNGROUPED = ("lora-ungrouped", "lora-bf16-ungrouped")
GRAFTING_ONLY = ("lora-exact", *COMPILED_FORMS, *DORA_SIDES, *UNGROUPED)


def ungrouped(fn: Callable[[], None], libs: dict[str, Any]) -> Callable[[], None]:
    """``fn`` run with grafting's shared-input grouping switched off."""

    def step() -> None:
        with libs["grafting"].shared_input_grouping(False):
            fn()

    return step


def wrap(lib_name: str, libs: dict[str, Any], base: nn.Module, method: str, r: int) -> nn.Module:
    cfg, options = config(libs[lib_name], method, r)
    model = libs[lib_name].get_peft_model(copy.deepcopy(base), cfg, **options)
    if method in COMPILED_FORMS:  # on this model's layers only, so the variants after it run as configured
        for module in model.modules():
            if hasattr(module, "compiled_form"):
                module.compiled_form = COMPILED_FORMS[method]
    return model


def _cpu_op(event: Any) -> str:
    return event.name.removeprefix("aten::")


@functools.cache
def _decomposes(op: str) -> bool:
    """Whether aten ``op`` is only a composition of other ops (CompositeImplicitAutograd in every overload)."""
    try:
        overloads = getattr(torch.ops.aten, op).overloads()
    except (AttributeError, RuntimeError):
        return False
    implicit = []
    for overload in overloads:
        with contextlib.suppress(RuntimeError):  # an overload the dispatcher does not know (TorchScript's)
            name = f"aten::{op}" if overload == "default" else f"aten::{op}.{overload}"
            implicit.append(torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeImplicitAutograd"))
    return bool(implicit) and all(implicit)


def _dispatched(event: Any) -> bool:
    """An aten op that reaches a kernel of its own (what :func:`count_ops` counts), not a composition."""
    return event.name.startswith("aten::") and not _decomposes(_cpu_op(event))


def _cpu_work(event: Any) -> bool:
    """A dispatched aten op called by none (its calls -- a copy inside addmm -- are part of its kernel), not a view."""
    if not _dispatched(event) or _cpu_op(event) in NO_KERNEL | {"detach_"}:
        return False
    parent = event.cpu_parent
    while parent is not None:
        if _dispatched(parent):
            return False
        parent = parent.cpu_parent
    return True


def _cpu_name(event: Any) -> str:
    """The op's name, ``Optimizer.step/`` in front when the optimizer called it."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("Optimizer.step"):
            return f"Optimizer.step/{event.name}"
        parent = parent.cpu_parent
    return event.name


@dataclasses.dataclass
class StepProfile:
    """One profiled step: its kernels (name, ms), the host's wall time and the kernels' span (first start to last end)."""

    kernels: list[tuple[str, float]]
    wall_ms: float
    span_ms: float

    @property
    def kernel_ms(self) -> float:
        return sum(ms for _, ms in self.kernels)


def profile_step(step: Callable[[], None], device: str) -> StepProfile:
    """Profile one step: its CUDA kernels, or on the CPU its outermost dispatched aten ops (their time)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with torch_profile(activities=activities) as prof:
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        wall = 1000 * (time.perf_counter() - start)
    events = prof.events()
    if not cuda:
        kernels = [(_cpu_name(e), e.cpu_time_total / 1000) for e in events if _cpu_work(e)]
        return StepProfile(kernels, wall, float("nan"))
    return device_profile(events, wall)


def device_profile(events: Any, wall_ms: float) -> StepProfile:
    """The CUDA kernels (and copies) among a profiler's events, their device ms and span.

    A ``record_function`` range (the optimizer's ``Optimizer.step#AdamW.step``) is also a device event, spanning
    the kernels it launched: it is left out (counted, it added its span to the kernel time a second time).
    """
    cuda = torch.autograd.DeviceType.CUDA
    kernels = [e for e in events if e.device_type == cuda and not getattr(e, "is_user_annotation", False)]
    span = 0.0
    if kernels:
        span = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)) / 1000
    return StepProfile([(e.name, e.device_time / 1000) for e in kernels], wall_ms, span)


def profile(
    step: Callable[[], None],
    label: str,
    device: str = "cuda",
    against: StepProfile | None = None,
    timed_ms: float | None = None,
    reference: str = "bound",
) -> StepProfile:
    """Print one step's top kernels, its launches per category (beside ``against``'s, named ``reference``) and
    host time."""
    found = profile_step(step, device)
    unit = "kernels" if device.startswith("cuda") else "aten ops (CPU)"
    print(f"--- profile {label}: {len(found.kernels)} {unit}, {found.kernel_ms:.1f} ms of kernel time", flush=True)
    timed = f"; the timed median step {timed_ms:.1f} ms" if timed_ms is not None else ""
    if device.startswith("cuda"):
        reference = timed_ms if timed_ms is not None else found.wall_ms
        print(
            f"  host wall of the profiled step {found.wall_ms:.1f} ms (under the profiler), kernels' span "
            f"{found.span_ms:.1f} ms{timed}: kernels busy {found.kernel_ms / reference:.0%} of the "
            f"{'timed step' if timed_ms is not None else 'wall'}, the device idle "
            f"{reference - found.kernel_ms:.1f} ms waiting for the host (host-bound where that is large)",
            flush=True,
        )
    else:
        print(
            f"  host wall of the profiled step {found.wall_ms:.1f} ms{timed}: the ops' own work "
            f"{found.kernel_ms / found.wall_ms:.0%} of the wall (the rest Python, dispatch, autograd)",
            flush=True,
        )
    by_name: dict[str, list[float]] = {}
    for name, ms in found.kernels:
        by_name.setdefault(name[:90], []).append(ms)
    for name, times in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:14]:
        print(f"  {sum(times):8.2f} ms {len(times):5d}x  {name}", flush=True)
    mine = kernel_categories.tally(found.kernels)
    if against is None:
        print(f"  {'category':17} {'n':>8} {'ms':>8}", flush=True)
        for category, (n, ms) in mine.items():
            if n:
                print(f"  {category:17} {n:8d} {ms:8.2f}", flush=True)
    else:
        table = kernel_categories.side_by_side(kernel_categories.tally(against.kernels), mine, reference)
        print("\n".join(table), flush=True)
    return found


def saved_for_backward(step: Callable[[], None], resident: list[torch.Tensor]) -> dict[str, float]:
    """What autograd saves for backward in one step, each storage once: all of it, and what is not resident.

    ``resident`` (the model's parameters and buffers, the input) is memory the step does not add;
    the rest is activations held from the forward to the backward -- most of the peak-memory row.
    """
    own = {t.untyped_storage().data_ptr() for t in resident}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    added = [n for ptr, n in storages.items() if ptr not in own]
    return {
        "saved_mib": sum(storages.values()) / 2**20,
        "saved_activation_mib": sum(added) / 2**20,
        "saved_storages": len(storages),
    }


#: aten ops that launch no kernel (views, allocations): left out of :func:`count_ops`
NO_KERNEL = {
    "view",
    "_unsafe_view",
    "t",
    "transpose",
    "unsqueeze",
    "squeeze",
    "expand",
    "as_strided",
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "detach",
    "alias",
    "permute",
    "reshape",
    "_reshape_alias",
    "select",
    "slice",
    "lift_fresh",
    "resolve_conj",
    "resolve_neg",
}


def count_ops(step: Callable[[], None]) -> int:
    """aten ops of one step that launch a kernel (views and allocations left out): the host's work, on any device."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if func.overloadpacket.__name__ not in NO_KERNEL:
                Count.ops += 1
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return Count.ops


def dynamo_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {
        "graph_breaks": sum(counters["graph_break"].values()),
        "unique_graphs": counters["stats"]["unique_graphs"],
    }


@dataclasses.dataclass
class Series:
    """One figure over the rounds: its ms and, round by round, the ms it is a ratio to (measured in that round)."""

    figure: str
    lib: str
    rounds_ms: list[float] = dataclasses.field(default_factory=list)
    against_ms: list[float] = dataclasses.field(default_factory=list)
    peaks: list[float] = dataclasses.field(default_factory=list)
    more: dict[str, Any] = dataclasses.field(default_factory=dict)

    def add(self, ms: float, against: float, peak: float, more: dict[str, Any]) -> None:
        self.rounds_ms.append(ms)
        self.against_ms.append(against)
        self.peaks.append(peak)
        for key, value in more.items():  # the first round's counts (ops, saved bytes) stand for every round
            self.more.setdefault(key, value)

    def row(self) -> dict[str, Any]:
        """The JSON row: the median over rounds of the ms and of the ratio, the fastest round's, every round's."""
        ratios = [ms / against for ms, against in zip(self.rounds_ms, self.against_ms)]
        # the round it stood lowest against its bound (of equal ratios, as the bound's own: the fastest)
        fastest = min(range(len(ratios)), key=lambda i: (round(ratios[i], 9), self.rounds_ms[i]))
        median_ms = statistics.median(self.rounds_ms)
        median_ratio = statistics.median(ratios)
        peaks = [p for p in self.peaks if not math.isnan(p)]
        return {
            "figure": self.figure,
            "lib": self.lib,
            "ms": median_ms,
            "median_ms": median_ms,
            "fastest_ms": self.rounds_ms[fastest],
            "rounds_ms": [round(ms, 3) for ms in self.rounds_ms],
            "ratio": median_ratio,
            "fastest_ratio": ratios[fastest],
            "rounds_ratio": [round(r, 4) for r in ratios],
            "spread": (max(ratios) - min(ratios)) / median_ratio,
            "peak_mib": max(peaks) if peaks else float("nan"),
            **self.more,
        }


def rotated(items: list[Any], turn: int) -> list[Any]:
    """``items`` started at index ``turn`` (mod its length): each round measures another variant first."""
    if not items:
        return []
    turn %= len(items)
    return items[turn:] + items[:turn]


def summary_table(rows: list[dict[str, Any]]) -> list[str]:
    """The rows as a markdown table: figure, lib, median ratio, fastest round's ratio, median ms, peak MiB."""
    lines = [
        "| figure | lib | median ratio | fastest round | ms (median) | peak MiB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        peak = "–" if math.isnan(row["peak_mib"]) else f"{row['peak_mib']:.0f}"
        lines.append(
            f"| {row['figure']} | {row['lib']} | {row['ratio']:.2f}× | {row['fastest_ratio']:.2f}× "
            f"| {row['median_ms']:.2f} | {peak} |"
        )
    return lines


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="1b", choices=sorted(PRESETS))
    parser.add_argument("--part", default="eager", choices=["eager", "compile", "big"])
    parser.add_argument(
        "--methods",
        default="lora,lora-ungrouped,lora-bf16,lora-exact,lora-dropout,dora,dora-dropout,ia3,prefix,loha,oft,boft,adalora",
    )
    parser.add_argument("--libs", default="grafting,peft")
    parser.add_argument(
        "--no-grouping", action="store_true", help="grafting's shared-input grouping off for every variant"
    )
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds: the bound, then every variant")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="append each result as one JSON line here")
    parser.add_argument("--ops", action="store_true", help="count each eager step's kernel-launching aten ops")
    parser.add_argument("--compile-mode", default=None, help="torch.compile's mode for --part compile (bound too)")
    parser.add_argument(
        "--profile",
        default="",
        help="variants (method:lib,... or bound) to profile once: top kernels, launches and ms per category beside"
        " the bound's, host time",
    )
    parser.add_argument(
        "--saved",
        action="store_true",
        help="bytes autograd saves for backward in one step (the bound's, each variant's)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


class Bench:
    """The run: every round measures the bound, then each (method, lib) variant, rotated a place each round."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.shape = PRESETS[args.preset]
        self.libs = libraries()
        self.run = timer(args.device)
        self.base = build_base(self.shape, args.device, moe=args.preset.startswith("moe"))
        self.ids = torch.randint(0, VOCAB, (self.shape["batch"], self.shape["seq"]), device=args.device)
        self.compiled = args.part == "compile"
        self.profiled = [name for name in args.profile.split(",") if name]
        self.series: dict[tuple[str, str], Series] = {}
        self.skipped: set[tuple[str, str]] = set()
        self.bound_profile: StepProfile | None = None
        self.forward_profile: StepProfile | None = None  # the base forward's, beside an inference profile
        self.round = 0
        self.header = {
            "preset": args.preset,
            "shape": self.shape,
            "part": args.part,
            "compile_mode": args.compile_mode,
            "r": args.r,
            "rounds": args.rounds,
            "steps": args.steps,
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "peft": self.libs["peft"].__version__,
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "grouping": not args.no_grouping,
        }

    def record(self, figure: str, lib: str, ms: float, against: float, peak: float = float("nan"), **more: Any) -> None:
        """One round's figure: printed as measured, kept for the medians."""
        series = self.series.setdefault((figure, lib), Series(figure, lib))
        series.add(ms, against, peak, more)
        print(
            f"[round {self.round + 1}] {figure:28} {lib:9} {ms:9.2f} ms  {ms / against:5.2f}x  "
            f"peak {peak:8.0f} MiB {_shown(more)}",
            flush=True,
        )

    def variants(self) -> list[tuple[str, str]]:
        names = [(m, lib) for m in self.args.methods.split(",") for lib in self.args.libs.split(",")]
        return [(m, lib) for m, lib in names if not (lib == "peft" and m in GRAFTING_ONLY)]

    def measure(self) -> list[dict[str, Any]]:
        """Every round, then the rows: medians over rounds, in the first round's order."""
        print(json.dumps(self.header), flush=True)
        try:
            for turn in range(self.args.rounds):
                self.round = turn
                self.measure_bound()
                for method, lib in rotated(self.variants(), self.round):
                    if (method, lib) not in self.skipped:
                        self.measure_guarded(method, lib)
        except KeyboardInterrupt:  # Ctrl-C or a time limit's SIGTERM: report the rounds measured so far
            print(f"interrupted in round {self.round + 1}: the figures below are over the rounds measured", flush=True)
        return [series.row() for series in self.series.values()]

    def measure_bound(self) -> None:
        """This round's bound (frozen base forward and backward) and base forward, on a copy freed after."""
        args, run = self.args, self.run
        bound_model = copy.deepcopy(self.base)
        embeds_need_grad(bound_model, self.compiled)
        if self.compiled:
            from torch._dynamo.utils import counters

            counters.clear()
        bound_model.train()
        target = torch.compile(bound_model, mode=args.compile_mode) if self.compiled else bound_model
        bound_step = train_step(target, self.ids, [])
        self.bound = run(bound_step, args.warmup, args.steps)
        more = dynamo_counts() if self.compiled else {}
        if self.round == 0 and args.saved:
            more.update(saved_for_backward(bound_step, [*bound_model.parameters(), *bound_model.buffers(), self.ids]))
        if self.round == 0 and self.profiled:  # the bound's profile, beside which each variant's is printed
            if "bound" in self.profiled:
                self.bound_profile = profile(bound_step, "bound", args.device, timed_ms=self.bound)
            else:
                self.bound_profile = profile_step(bound_step, args.device)
        self.record("bound (train)", "base", self.bound, self.bound, peak_mib(bound_step, args.device), **more)
        bound_model.eval()
        base_forward = infer(target, self.ids)
        self.base_fwd = run(base_forward, args.warmup, args.steps)
        if self.round == 0 and any(name.endswith(":inference") for name in self.profiled):
            self.forward_profile = profile_step(base_forward, args.device)
        self.record("base forward", "base", self.base_fwd, self.base_fwd)
        del bound_model, target, bound_step
        self.release()

    def measure_guarded(self, method: str, lib: str) -> None:
        """One variant's round; out of memory, it is left out of the rounds after and the run goes on."""
        try:
            self.measure_variant(method, lib)
        except torch.OutOfMemoryError as exc:
            print(f"{method} {lib}: out of memory in round {self.round + 1}, left out from here ({exc})", flush=True)
            self.skipped.add((method, lib))
        self.release()  # after the handler: the failed round's frames (its model) are gone

    def measure_variant(self, method: str, lib: str) -> None:
        """This round's figures of one variant: its training step, and inference/routed rows where it has them."""
        args, libs, run, ids = self.args, self.libs, self.run, self.ids
        try:
            model = wrap(lib, libs, self.base, method, args.r)
        except Exception as exc:  # a method or option one library lacks
            print(f"{method} {lib}: skipped ({type(exc).__name__}: {exc})", flush=True)
            self.skipped.add((method, lib))
            return
        first = self.round == 0
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        if self.compiled:
            from torch._dynamo.utils import counters

            counters.clear()
        target = torch.compile(model, mode=args.compile_mode) if self.compiled else model
        step = train_step(target, ids, params)
        plain = lib == "grafting" and (method in UNGROUPED or args.no_grouping)
        if plain:
            step = ungrouped(step, libs)
        start = time.perf_counter()
        with variant_settings(method):
            ms = run(step, args.warmup, args.steps)
        more: dict[str, Any] = {"wall_s": round(time.perf_counter() - start, 1)}
        with variant_settings(method):
            if self.compiled:
                more.update(dynamo_counts())
            elif args.ops and first:
                more["aten_ops"] = count_ops(step)
            if args.saved and first:
                more.update(saved_for_backward(step, [*model.parameters(), *model.buffers(), ids]))
            self.record(f"{method} step", lib, ms, self.bound, peak_mib(step, args.device), **more)
            if first and f"{method}:{lib}" in self.profiled:
                profile(step, f"{method} {lib}", args.device, against=self.bound_profile, timed_ms=ms)
        if method in ("lora", "lora-bf16", *UNGROUPED) or method in COMPILED_FORMS:
            model.eval()
            forward = ungrouped(infer(target, ids), libs) if plain else infer(target, ids)
            forward_ms = run(forward, args.warmup, args.steps)
            self.record(f"{method} inference", lib, forward_ms, self.base_fwd)
            if first and f"{method}:{lib}:inference" in self.profiled:
                label = f"{method} {lib} inference (beside the base forward)"
                profile(forward, label, args.device, self.forward_profile, forward_ms, reference="base fwd")
        if method == "lora" and not self.compiled:
            self.record("lora routed, 1 adapter", lib, *_routed(lib, libs, model, ids, args, run))
            if lib == "grafting":  # PEFT refuses adapter_names in training
                routed = _routed_training(
                    libs, self.base, ids, args, run, profiled=first and "lora:grafting:routed" in self.profiled
                )
                self.record("lora routed train, 1 adapter", lib, *routed)
        del model, target, step, params
        self.release()

    def release(self) -> None:
        """Free what the last model held (its compiled graphs too) before the next is built."""
        gc.collect()
        if self.compiled:
            torch._dynamo.reset()
        if self.args.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def report(self, rows: list[dict[str, Any]]) -> None:
        """Each figure's median over rounds, fastest round and spread; the markdown summary; the JSON lines."""
        measured = max((len(row["rounds_ms"]) for row in rows), default=0)
        rounds = f"{measured}" if measured == self.args.rounds else f"{measured} of {self.args.rounds}"
        print(f"=== {rounds} rounds: median over rounds (ratios to the same round's bound)", flush=True)
        bound_saved = next((row.get("saved_activation_mib") for row in rows if row["figure"] == "bound (train)"), None)
        for row in rows:
            low, high = min(row["rounds_ratio"]), max(row["rounds_ratio"])
            saved = row.get("saved_activation_mib")
            beside = f"  saved {saved:.1f} MiB (bound +{saved - bound_saved:.1f})" if saved and bound_saved else ""
            print(
                f"{row['figure']:28} {row['lib']:9} {row['median_ms']:9.2f} ms  {row['ratio']:5.2f}x  "
                f"fastest round {row['fastest_ratio']:5.2f}x ({row['fastest_ms']:.2f} ms)  rounds {low:.2f}-{high:.2f}x "
                f"spread {row['spread']:5.1%}{beside}",
                flush=True,
            )
        print("\n".join(["", *summary_table(rows), ""]), flush=True)
        if self.args.json:
            with open(self.args.json, "a") as fh:
                for row in rows:
                    fh.write(json.dumps({**self.header, **row}) + "\n")
            print(f"rows appended to {self.args.json}", file=sys.stderr)


def _shown(more: dict[str, Any]) -> str:
    """A round's extra figures as printed: floats to two places."""
    if not more:
        return ""
    return str({key: round(value, 2) if isinstance(value, float) else value for key, value in more.items()})


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    bench = Bench(parse(argv))
    kept = signal.signal(signal.SIGTERM, _interrupt)  # a time limit's SIGTERM still gets the rounds measured
    try:
        rows = bench.measure()
    finally:
        signal.signal(signal.SIGTERM, kept)
    bench.report(rows)


def _routed(
    lib: str, libs: dict[str, Any], model: nn.Module, ids: torch.Tensor, args: argparse.Namespace, run: Callable
) -> tuple[float, float]:
    """Four adapters routed per sample against the same model with one adapter for all (inference)."""
    cfg, _ = config(libs[lib], "lora", args.r)
    one = run(infer(model, ids), args.warmup, args.steps)
    for k in range(1, 4):
        model.add_adapter(f"extra{k}", copy.deepcopy(cfg))
    names = [["default", "extra1", "extra2", "extra3"][i % 4] for i in range(ids.shape[0])]
    model.eval()
    four = run(infer(model, ids, adapter_names=names), args.warmup, args.steps)
    print(f"  4 adapters per sample: {four:.2f} ms against one adapter {one:.2f} ms = {four / one:.2f}x", flush=True)
    if lib == "grafting":
        with _gathered():
            gathered = run(infer(model, ids, adapter_names=names), args.warmup, args.steps)
        print(f"  (each sample's own factors gathered, the previous path: {gathered / one:.2f}x)", flush=True)
    return four, one


@contextlib.contextmanager
def _gathered() -> Any:
    """grafting's routed LoRA layers on the gathered path (each sample's own padded factors), for comparison."""
    import grafting_lora.layers as layers

    kept = layers.MAX_COLUMNS
    layers.MAX_COLUMNS = 0
    try:
        yield
    finally:
        layers.MAX_COLUMNS = kept


def _routed_training(
    libs: dict[str, Any],
    base: nn.Module,
    ids: torch.Tensor,
    args: argparse.Namespace,
    run: Callable,
    profiled: bool = False,
) -> tuple[float, float]:
    """A training step with four adapters routed per sample against one adapter's step (grafting only);
    ``profiled``: the routed step's profile beside the single adapter's."""
    cfg, _ = config(libs["grafting"], "lora", args.r)
    model = libs["grafting"].get_peft_model(copy.deepcopy(base), cfg)
    model.train()
    single = train_step(model, ids, [p for p in model.parameters() if p.requires_grad])
    one = run(single, args.warmup, args.steps)
    single_profile = profile_step(single, args.device) if profiled else None
    names = ["default", "extra1", "extra2", "extra3"]
    for name in names[1:]:
        model.add_adapter(name, copy.deepcopy(cfg))
    model.base_model.set_adapter(names)  # all four active and trainable; each sample reaches its own
    routes = [names[i % 4] for i in range(ids.shape[0])]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step() -> None:
        model(input_ids=ids, labels=ids, adapter_names=routes).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    four = run(step, args.warmup, args.steps)
    print(f"  4 adapters routed in training: {four:.2f} ms against one adapter {one:.2f} ms = {four / one:.2f}x")
    if single_profile is not None:
        label = "lora grafting, 4 adapters routed in training (beside one adapter's step)"
        profile(step, label, args.device, against=single_profile, timed_ms=four, reference="1 adapter")
    with _gathered():
        gathered = run(step, args.warmup, args.steps)
    print(f"  (each sample's own factors gathered, the previous path: {gathered / one:.2f}x)", flush=True)
    return four, one


if __name__ == "__main__":
    main()
