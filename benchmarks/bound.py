"""Every layer method against the hardware bound, grafting beside PEFT, eager and compiled, in one run.

Usage: python benchmarks/bound.py [--preset 1b|8b|tiny] [--part eager|compile] [--json out.json] [--ops]
[--compile-mode max-autotune-no-cudagraphs] (compiled LoRA's forms: --methods lora,lora-node,lora-op)
(also `nox -s bench -- --bound ...`).

The bound is the frozen base model's training forward plus its activation
gradients (no adapter, no optimizer): what any adapter's step must at least do.
A step of a variant is forward, backward and AdamW over the adapter weights;
each figure is its CUDA-event median over ``--steps`` steps after warm-up,
reported as a ratio to the bound measured in the same run (the compiled bound
for compiled variants). Inference figures are no-grad forwards against the
base's forward; the routed figure is four adapters routed per sample against
one adapter. Peak memory is what a step allocates above what is resident. ``--ops`` adds each
eager step's count of kernel-launching aten ops (the host's work; the same on CPU and GPU).
``lora-ungrouped`` (and ``lora-bf16-ungrouped``) is the ``lora`` row with grafting's shared-input
grouping off (q/k/v's and gate/up's A products one per layer); ``--no-grouping`` turns it off for
every variant.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

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


def _embeds_need_grad(model: nn.Module, compiled: bool = False) -> None:
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


def profile(step: Callable[[], None], label: str) -> None:
    """Print one step's top kernels by device time and its number of kernel launches."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time for e in kernels) / 1000
    print(f"--- profile {label}: {len(kernels)} kernels, {total:.1f} ms of kernel time", flush=True)
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:90], []).append(e.device_time / 1000)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:14]
    for name, times in top:
        print(f"  {sum(times):8.2f} ms {len(times):5d}x  {name}", flush=True)


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


def main(argv: list[str] | None = None) -> None:
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
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="append each result as one JSON line here")
    parser.add_argument("--ops", action="store_true", help="count each eager step's kernel-launching aten ops")
    parser.add_argument("--compile-mode", default=None, help="torch.compile's mode for --part compile (bound too)")
    parser.add_argument("--profile", default="", help="variants (method:lib,...) to profile: top kernels, launches")
    args = parser.parse_args(argv)

    shape = PRESETS[args.preset]
    libs = libraries()
    run = timer(args.device)
    base = build_base(shape, args.device, moe=args.preset.startswith("moe"))
    ids = torch.randint(0, VOCAB, (shape["batch"], shape["seq"]), device=args.device)
    rows: list[dict[str, Any]] = []
    header = {
        "preset": args.preset,
        "shape": shape,
        "part": args.part,
        "compile_mode": args.compile_mode,
        "r": args.r,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "peft": libs["peft"].__version__,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "grouping": not args.no_grouping,
    }
    print(json.dumps(header), flush=True)

    def record(figure: str, lib: str, ms: float, against: float, peak: float = float("nan"), **more: Any) -> None:
        row = {"figure": figure, "lib": lib, "ms": ms, "ratio": ms / against, "peak_mib": peak, **more}
        rows.append(row)
        print(f"{figure:28} {lib:9} {ms:9.2f} ms  {row['ratio']:5.2f}x  peak {peak:8.0f} MiB {more or ''}", flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps({**header, **row}) + "\n")

    methods = args.methods.split(",")
    lib_names = args.libs.split(",")
    compiled = args.part == "compile"

    bound_model = copy.deepcopy(base)
    _embeds_need_grad(bound_model, compiled)
    bound_model.train()
    target = torch.compile(bound_model, mode=args.compile_mode) if compiled else bound_model
    bound_step = train_step(target, ids, [])
    bound = run(bound_step, args.warmup, args.steps)
    bound_counts = dynamo_counts() if compiled else {}
    if "bound" in args.profile.split(","):
        profile(bound_step, "bound")
    record("bound (train)", "base", bound, bound, peak_mib(bound_step, args.device), **bound_counts)
    bound_model.eval()
    base_fwd = run(infer(target, ids), args.warmup, args.steps)
    record("base forward", "base", base_fwd, base_fwd)
    del bound_model, target, bound_step
    if compiled:
        torch._dynamo.reset()

    for method in methods:
        for lib in lib_names:
            if lib == "peft" and (method in GRAFTING_ONLY or method in COMPILED_FORMS):
                continue
            try:
                model = wrap(lib, libs, base, method, args.r)
            except Exception as exc:  # a method or option one library lacks
                print(f"{method} {lib}: skipped ({type(exc).__name__}: {exc})", flush=True)
                continue
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            if compiled:
                from torch._dynamo.utils import counters

                counters.clear()
            target = torch.compile(model, mode=args.compile_mode) if compiled else model
            step = train_step(target, ids, params)
            plain = lib == "grafting" and (method in UNGROUPED or args.no_grouping)
            if plain:
                step = ungrouped(step, libs)
            start = time.perf_counter()
            with variant_settings(method):
                ms = run(step, args.warmup, args.steps)
            more = {"wall_s": round(time.perf_counter() - start, 1)}
            if compiled:
                more.update(dynamo_counts())
            elif args.ops:
                with variant_settings(method):
                    more["aten_ops"] = count_ops(step)
            with variant_settings(method):
                record(f"{method} step", lib, ms, bound, peak_mib(step, args.device), **more)
                if f"{method}:{lib}" in args.profile.split(","):
                    profile(step, f"{method} {lib}")
            if method in ("lora", "lora-bf16", *UNGROUPED) or method in COMPILED_FORMS:
                model.eval()
                forward = ungrouped(infer(target, ids), libs) if plain else infer(target, ids)
                record(f"{method} inference", lib, run(forward, args.warmup, args.steps), base_fwd)
            if method == "lora" and not compiled:
                record("lora routed, 1 adapter", lib, *_routed(lib, libs, model, ids, args, run))
                if lib == "grafting":  # PEFT refuses adapter_names in training
                    record("lora routed train, 1 adapter", lib, *_routed_training(libs, base, ids, args, run))
            del model, target, step, params
            gc.collect()
            if compiled:
                torch._dynamo.reset()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    if args.json:
        print(f"rows appended to {args.json}", file=sys.stderr)


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
    libs: dict[str, Any], base: nn.Module, ids: torch.Tensor, args: argparse.Namespace, run: Callable
) -> tuple[float, float]:
    """A training step with four adapters routed per sample against one adapter's step (grafting only)."""
    cfg, _ = config(libs["grafting"], "lora", args.r)
    model = libs["grafting"].get_peft_model(copy.deepcopy(base), cfg)
    model.train()
    one = run(train_step(model, ids, [p for p in model.parameters() if p.requires_grad]), args.warmup, args.steps)
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
    with _gathered():
        gathered = run(step, args.warmup, args.steps)
    print(f"  (each sample's own factors gathered, the previous path: {gathered / one:.2f}x)", flush=True)
    return four, one


if __name__ == "__main__":
    main()
