"""grafting vs PEFT, side by side in one run: training-step time, inference time and memory.

Usage: python benchmarks/bench.py [--hidden 256 --layers 4 --batch 4 --seq 128 --steps 10 --json out.json]
       python benchmarks/bench.py --bound [bound.py's options]   (GPU: ratios to the hardware bound)

For each method both libraries wrap the same Llama-shaped model with the same
config; the script times a training step (forward, backward, AdamW) and an
inference forward, interleaving the two libraries so machine noise hits both,
and reports medians and grafting/PEFT ratios. Memory is the size of the
tensors autograd saves for backward in one training forward (deterministic,
any device), plus, on a GPU, the peak memory a training step allocates above what is resident.
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
from transformers import LlamaConfig, LlamaForCausalLM


def build_base(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.75),
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 256),
        max_position_embeddings=max(2048, args.seq),
    )
    return LlamaForCausalLM(config).to(args.device, dtype=getattr(torch, args.dtype))


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def configs(lib: str, r: int) -> dict[str, Any]:
    """The same adapter configs, spelled for each library."""
    if lib == "peft":
        import peft

        mod: Any = peft
    else:
        import grafting

        mod = grafting
    out = {
        "lora": mod.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False),
        "dora": mod.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, use_dora=True, init_lora_weights=False),
    }
    for name, cls, kwargs in (
        ("loha", "LoHaConfig", {"r": r, "alpha": 2 * r, "target_modules": TARGETS, "init_weights": False}),
        ("oft", "OFTConfig", {"r": 0, "oft_block_size": 32, "target_modules": TARGETS, "init_weights": False}),
        (
            "boft",
            "BOFTConfig",
            {"boft_block_size": 32, "boft_n_butterfly_factor": 2, "target_modules": TARGETS, "init_weights": False},
        ),
        ("lokr", "LoKrConfig", {"r": r, "alpha": 2 * r, "target_modules": TARGETS, "init_weights": False}),
        ("ln_tuning", "LNTuningConfig", {}),
        (
            "ia3",
            "IA3Config",
            {"target_modules": TARGETS, "feedforward_modules": ["down_proj"], "init_ia3_weights": False},
        ),
    ):
        with contextlib.suppress(Exception):  # plugin not installed: the method is skipped
            out[name] = getattr(mod, cls)(**kwargs)
    return out


def wrap(lib: str, base: torch.nn.Module, config: Any) -> torch.nn.Module:
    if lib == "peft":
        import peft

        return peft.get_peft_model(copy.deepcopy(base), config)
    import grafting

    return grafting.get_peft_model(copy.deepcopy(base), config)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def forward(model: torch.nn.Module, ids: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)


def saved_for_backward_mib(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """MiB of distinct tensors autograd keeps for backward during one training forward."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not t.is_meta and t.untyped_storage().nbytes():
            seen[(t.untyped_storage().data_ptr(), t.device.index or 0)] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    frozen = {id(p) for p in model.parameters()}
    del loss
    params = {(p.untyped_storage().data_ptr(), p.device.index or 0) for p in model.parameters() if id(p) in frozen}
    return sum(v for k, v in seen.items() if k not in params) / 2**20


def main() -> None:
    if "--bound" in sys.argv[1:]:  # the GPU mode: every method against the frozen-base bound (bound.py)
        import bound

        bound.main([a for a in sys.argv[1:] if a != "--bound"])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--methods", default="lora,dora,loha,ia3,oft,boft")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    base = build_base(args)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    wanted = args.methods.split(",")
    rows = []
    graft_cfgs, peft_cfgs = configs("grafting", args.r), configs("peft", args.r)
    for method in wanted:
        if method not in graft_cfgs or method not in peft_cfgs:
            print(f"{method}: skipped (not installed in both libraries)")
            continue
        models = {"grafting": wrap("grafting", base, graft_cfgs[method]), "peft": wrap("peft", base, peft_cfgs[method])}
        with torch.no_grad():  # same adapter weights in both, so both do the same arithmetic
            g_params = {n: p for n, p in models["grafting"].named_parameters() if p.requires_grad}
            p_params = [p for _, p in models["peft"].named_parameters() if p.requires_grad]
            if len(g_params) == len(p_params):
                for gp, pp in zip(g_params.values(), p_params, strict=True):
                    if gp.shape == pp.shape:
                        pp.copy_(gp)
        opts = {
            lib: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for lib, m in models.items()
        }
        train: dict[str, list[float]] = {"grafting": [], "peft": []}
        infer: dict[str, list[float]] = {"grafting": [], "peft": []}
        peak: dict[str, float] = {}

        for i in range(args.warmup + args.steps):
            for lib in ("grafting", "peft") if i % 2 == 0 else ("peft", "grafting"):
                model, opt = models[lib], opts[lib]
                t_train = timed(lambda model=model, opt=opt: train_step(model, opt, ids), args.device)
                t_infer = timed(lambda model=model: forward(model, ids), args.device)
                if i >= args.warmup:
                    train[lib].append(t_train)
                    infer[lib].append(t_infer)
        saved = {lib: saved_for_backward_mib(models[lib], ids) for lib in ("grafting", "peft")}
        for lib in ("grafting", "peft"):
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
                resident = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                train_step(models[lib], opts[lib], ids)
                peak[lib] = (torch.cuda.max_memory_allocated() - resident) / 2**20
            else:
                peak[lib] = float("nan")
        row = {
            "method": method,
            "train_ms_grafting": 1000 * statistics.median(train["grafting"]),
            "train_ms_peft": 1000 * statistics.median(train["peft"]),
            "infer_ms_grafting": 1000 * statistics.median(infer["grafting"]),
            "infer_ms_peft": 1000 * statistics.median(infer["peft"]),
            "saved_mib_grafting": saved["grafting"],
            "saved_mib_peft": saved["peft"],
            "peak_mib_grafting": peak["grafting"],
            "peak_mib_peft": peak["peft"],
        }
        row["train_ratio"] = row["train_ms_grafting"] / row["train_ms_peft"]
        row["infer_ratio"] = row["infer_ms_grafting"] / row["infer_ms_peft"]
        rows.append(row)
        del models, opts

    print(
        f"\nLlama-shaped: hidden={args.hidden} layers={args.layers} batch={args.batch}x{args.seq} r={args.r} "
        f"{args.dtype} on {args.device}; medians of {args.steps} steps"
    )
    print(
        f"{'method':8} {'train ms grafting/peft':>24} {'ratio':>6} {'infer ms grafting/peft':>24} {'ratio':>6}"
        f" {'saved-for-bwd MiB g/p':>22} {'peak MiB g/p':>16}"
    )
    for r in rows:
        print(
            f"{r['method']:8} {r['train_ms_grafting']:11.1f} /{r['train_ms_peft']:11.1f} {r['train_ratio']:6.2f} "
            f"{r['infer_ms_grafting']:11.1f} /{r['infer_ms_peft']:11.1f} {r['infer_ratio']:6.2f} "
            f"{r['saved_mib_grafting']:10.1f} /{r['saved_mib_peft']:10.1f} "
            + (
                f"{r['peak_mib_grafting']:7.0f} /{r['peak_mib_peft']:7.0f}"
                if args.device.startswith("cuda")
                else "    (GPU only)"
            )
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
