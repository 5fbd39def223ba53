"""Same-process A/B (GPU): each one-node layer against the composition it replaces, in interleaved rounds.

Usage: python benchmarks/probe_nodes.py. Host-bound steps (DoRA, LoRA dropout) move between
machines and processes; rounds in one process are the fair comparison. For IA3 the composition is
the plain bf16 path (``IA3Adapter.fused = False``), not the float32 one of before.
"""

import copy
import statistics
import sys

import torch

sys.path.insert(0, "benchmarks")
import bound

from grafting_ia3.layers import IA3Adapter
from grafting_lora.layers import LoraLinear

libs = bound.libraries()
shape = bound.PRESETS["1b"]
base = bound.build_base(shape, "cuda")
ids = torch.randint(0, bound.VOCAB, (shape["batch"], shape["seq"]), device="cuda")
run = bound.timer("cuda")
bound_model = copy.deepcopy(base)
bound.embeds_need_grad(bound_model)
bound_model.train()
b = run(bound.train_step(bound_model, ids, []), 3, 10)
del bound_model
print(f"bound {b:.2f} ms", flush=True)
original = LoraLinear.fused_call


def composed_lora(self, base_layer, x):  # main's path for DoRA and dropout: the layer composes
    if self.use_dora or (self.training and not isinstance(self.lora_dropout, torch.nn.Identity)):
        return None
    return original(self, base_layer, x)


for method in ("dora", "lora-dropout", "ia3"):
    model = bound.wrap("grafting", libs, base, method, 16)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    step = bound.train_step(model, ids, params)
    times = {"node": [], "composed": []}
    for _ in range(4):
        for variant in ("node", "composed"):
            LoraLinear.fused_call = original if variant == "node" else composed_lora
            IA3Adapter.fused = variant == "node"
            times[variant].append(run(step, 2, 8))
    LoraLinear.fused_call = original
    IA3Adapter.fused = True
    n, c = statistics.median(times["node"]), statistics.median(times["composed"])
    print(
        f"{method:13s} node {n:7.2f} ms = {n / b:.2f}x  composed {c:7.2f} ms = {c / b:.2f}x  rounds node {[round(t, 1) for t in times['node']]} composed {[round(t, 1) for t in times['composed']]}",
        flush=True,
    )
    if method == "dora":
        bound.profile(step, "dora node (after the rounds)")
    del model, step, params
    torch.cuda.empty_cache()
