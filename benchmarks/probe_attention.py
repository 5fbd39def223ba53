"""What a 30-token prefix costs one layer's attention (fwd+bwd, Llama 1B shapes), by SDPA variant (GPU).

Usage: python benchmarks/probe_attention.py. The bound is causal attention without a prefix;
transformers' way is SDPA with an explicit (batch, 1, q, n + q) mask; grafting_prefix.attention
pads the queries to the keys' length and keeps ``is_causal``.
"""

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

B, HQ, HKV, S, P, D = 8, 32, 4, 1024, 30, 64
dev, dt = "cuda", torch.bfloat16
q = torch.randn(B, HQ, S, D, device=dev, dtype=dt, requires_grad=True)
k = torch.randn(B, HKV, S + P, D, device=dev, dtype=dt, requires_grad=True)
v = torch.randn(B, HKV, S + P, D, device=dev, dtype=dt, requires_grad=True)
g = torch.randn(B, HQ, S, D, device=dev, dtype=dt)


def timeit(fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(n):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        ts.append(start.elapsed_time(end))
    ts.sort()
    return ts[len(ts) // 2]


def bound():
    out = F.scaled_dot_product_attention(q, k[:, :, P:], v[:, :, P:], is_causal=True, enable_gqa=True)
    out.backward(g)


mask = torch.ones(S, S + P, dtype=torch.bool, device=dev).tril(P)[None, None].expand(B, 1, S, S + P)


def transformers_way():
    kk, vv = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
    out.backward(g)


def padded_queries():
    qq = torch.cat([q.new_zeros(B, HQ, P, D), q], dim=2)
    out = F.scaled_dot_product_attention(qq, k, v, is_causal=True, enable_gqa=True)[:, :, P:]
    out.backward(g)


def lower_right():
    kk, vv = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=causal_lower_right(S, S + P))
    out.backward(g)


with torch.no_grad():
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(8, 1), v.repeat_interleave(8, 1), attn_mask=mask)
    pad = F.scaled_dot_product_attention(
        torch.cat([q.new_zeros(B, HQ, P, D), q], 2), k, v, is_causal=True, enable_gqa=True
    )[:, :, P:]
    print("padded-queries max err vs masked:", (pad.float() - ref.float()).abs().max().item(), flush=True)
for name, fn in [
    ("bound (no prefix, causal)", bound),
    ("prefix, bool mask (transformers)", transformers_way),
    ("prefix, padded queries + is_causal", padded_queries),
    ("prefix, causal_lower_right", lower_right),
]:
    try:
        print(f"attention fwd+bwd {name:40s} {timeit(fn):7.3f} ms per layer", flush=True)
    except Exception as exc:
        print(name, "failed", type(exc).__name__, str(exc)[:200], flush=True)
