"""Kernel names sorted into the categories a step's profile is read by (``bound.py --profile``).

A CUDA kernel's name (cuBLAS/CUTLASS GEMMs, ATen's templated launchers, Inductor's Triton kernels) or,
on the CPU, an aten op's name (``aten::addmm``; ``Optimizer.step/`` in front when the optimizer ran it)
goes to one category; :func:`tally` counts a profile's kernels per category and :func:`side_by_side`
prints the bound's and a variant's tallies with their difference.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

GEMM = "GEMM"
ELEMENTWISE = "elementwise"
COPIES = "casts/copies"
REDUCTIONS = "reductions"
DROPOUT = "dropout"
OPTIMIZER = "optimizer"
ATTENTION = "attention"
INDEXING = "indexing/scatter"
OTHER = "other"
#: the categories in the order they are printed
CATEGORIES = (GEMM, ATTENTION, ELEMENTWISE, COPIES, REDUCTIONS, DROPOUT, INDEXING, OPTIMIZER, OTHER)

#: first match wins: the specific launchers (optimizer, attention, dropout) before the generic ones
#: whose template arguments may name anything (an elementwise kernel's functor, a copy's cast)
_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (category, re.compile(pattern, re.IGNORECASE))
    for category, pattern in (
        (OPTIMIZER, r"^optimizer\.step|multi_tensor_apply|fused_adam|_fused_sgd|adamw?_kernel|_foreach_"),
        (ATTENTION, r"flash|fmha|sdpa|scaled_dot_product|efficient_attention|attention_kernel|cudnn_?attn"),
        (DROPOUT, r"dropout|bernoulli|philox|distribution_elementwise|\brand(n|_like)?\b"),
        (
            GEMM,
            r"gemm|gemv|cublas|cutlass|xmma|nvjet|splitkreduce|\b_?(add|b|addb|baddb|grouped_)?mm_?\b"
            r"|aten::(linear|matmul|dot|addmv|mv)\b",
        ),
        (COPIES, r"copy|memcpy|memset|catarraybatched|aten::(_to_copy|to|clone|cat|contiguous|stack)\b"),
        (INDEXING, r"index|scatter|gather|embedding|take_|masked_select|nonzero|\bsort|topk|histc|bincount"),
        (
            REDUCTIONS,
            r"reduce|reduction|softmax|layer_norm|rms_norm|norm_kernel|moments|nll_loss|cross_entropy"
            r"|aten::(sum|mean|norm|linalg_vector_norm|amax|max|min|var|std|prod|all|any)\b",
        ),
        (ELEMENTWISE, r"elementwise|functor|^aten::"),
    )
)
#: an Inductor pointwise kernel that fuses nothing but casts and copies
_TRITON_COPY = re.compile(r"triton_poi_fused_((_to_copy|clone|cat|copy|view|_unsafe_view)_?)+\d*")


def kernel_category(name: str) -> str:
    """The category of one kernel (or, on the CPU, aten op) by its profiled name."""
    name = name.strip()
    if name.startswith("triton_"):  # Inductor's: the prefix says the kind, the fused ops' names follow
        return _triton_category(name)
    for category, pattern in _RULES:
        if pattern.search(name):
            return category
    return OTHER


def _triton_category(name: str) -> str:
    if name.startswith("triton_tem_") or re.search(r"_(mm|bmm|addmm)(_|$)", name):
        return GEMM
    if re.search(r"dropout|bernoulli|rand", name):
        return DROPOUT
    if name.startswith(("triton_red_", "triton_per_")):
        return REDUCTIONS
    if _TRITON_COPY.fullmatch(name):
        return COPIES
    return ELEMENTWISE if name.startswith("triton_poi_") else OTHER


def tally(kernels: Iterable[tuple[str, float]]) -> dict[str, tuple[int, float]]:
    """Kernels (name, ms) counted per category: category -> (launches, ms), every category present."""
    counts = {category: [0, 0.0] for category in CATEGORIES}
    for name, ms in kernels:
        entry = counts[kernel_category(name)]
        entry[0] += 1
        entry[1] += ms
    return {category: (int(n), float(ms)) for category, (n, ms) in counts.items()}


def side_by_side(
    bound: dict[str, tuple[int, float]], variant: dict[str, tuple[int, float]], reference: str = "bound"
) -> list[str]:
    """A table's lines: each category's launches and ms in the bound (or the ``reference`` named), in the
    variant, and what the variant adds."""
    lines = [
        f"  {'category':17} {reference + ' n':>11} {'ms':>8}  {'variant n':>9} {'ms':>8}  {'added n':>8} {'ms':>8}"
    ]
    rows = [*CATEGORIES, "total"]
    total_bound = (sum(n for n, _ in bound.values()), sum(ms for _, ms in bound.values()))
    total_variant = (sum(n for n, _ in variant.values()), sum(ms for _, ms in variant.values()))
    for category in rows:
        b_n, b_ms = total_bound if category == "total" else bound.get(category, (0, 0.0))
        v_n, v_ms = total_variant if category == "total" else variant.get(category, (0, 0.0))
        if category != "total" and b_n == v_n == 0:
            continue
        lines.append(
            f"  {category:17} {b_n:11d} {b_ms:8.2f}  {v_n:9d} {v_ms:8.2f}  {v_n - b_n:+8d} {v_ms - b_ms:+8.2f}"
        )
    return lines
