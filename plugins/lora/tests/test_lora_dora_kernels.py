"""DoRA's kernels (grafting_lora.dora_kernels) against the torch ops they replace: compiled on a GPU where there is
one, else in Triton's interpreter on the CPU; and compiled for an H100 without one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dora_helpers import DEVICE, GPU, dora_kernels_on
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from grafting.testing import assert_close
from grafting_lora import dora_kernels
from grafting_lora.dora_kernels import row_scales, scaled_gradient, triton_runs
from grafting_lora.scaled_products import writes_float32

HALF = [torch.bfloat16, torch.float16]
DTYPES = [*HALF, torch.float32]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_the_kernels_run_on_cpu_tensors_only_interpreted() -> None:
    """On CPU tensors the kernels run only in the interpreter, on CUDA tensors compiled; switched off, nowhere."""
    t = torch.zeros(3, device=DEVICE)
    with dora_kernels_on(True):
        assert triton_runs(t)
        dora_kernels.INTERPRETED = False
        assert triton_runs(t) == GPU  # a CPU tensor outside the interpreter: the torch ops
        assert not triton_runs(t.cpu())
    with dora_kernels_on(False):
        assert not triton_runs(t)


@given(
    rows=st.integers(1, 140),  # across BLOCK_ROWS (64)
    n_in=st.integers(1, 300),
    rank=st.integers(1, 20),  # across the kernel's smallest rank block (16)
    dtype=st.sampled_from(HALF),
    scaling=st.sampled_from([0.5, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_the_row_scale_kernel_is_the_torch_ops(
    rows: int, n_in: int, rank: int, dtype: torch.dtype, scaling: float, seed: int
) -> None:
    """``1/‖W + ΔW‖``, ``m/‖W + ΔW‖``, the latter, ``scaling·B`` and ``A`` in W's dtype: one kernel, the torch ops.

    Both norms within two roundings of W's dtype of the exact ones (on CUDA the kernel's ``W·Aᵀ`` is not rounded).
    """
    g = _gen(seed)
    w = (torch.randn(rows, n_in, generator=g).abs() + 0.1).to(DEVICE, dtype)
    a = (torch.rand(rank, n_in, generator=g) + 0.2).to(DEVICE)  # ΔW = scaling·B·A of W's sign: every norm grows
    b = (torch.rand(rows, rank, generator=g) + 0.2).to(DEVICE)
    m = (torch.rand(rows, generator=g) + 0.5).to(DEVICE)
    sq = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32).square()
    with dora_kernels_on(False):
        inv, scale, half, up, a_half = row_scales(w, a, b, sq, m, scaling)
    with dora_kernels_on(True):
        k_inv, k_scale, k_half, k_up, k_a_half = row_scales(w, a, b, sq, m, scaling)
    exact = torch.linalg.vector_norm(w.double() + scaling * b.double() @ a.double(), dim=1).reciprocal()
    assert (exact * sq.double().sqrt() < 0.995).all()  # the adapter moves every norm
    eps = torch.finfo(dtype).eps
    for got in (inv, k_inv):
        assert_close(got, exact.float(), rtol=2 * eps, atol=0.0)
    assert_close(k_scale, m * k_inv)
    # the interpreter rounds to bfloat16 half-up, the GPU and torch to nearest even
    assert_close((k_half, k_up, k_a_half), (half, up, a_half), changed_from=(scale.to(dtype), b.to(dtype), a.to(dtype)))


@given(
    tokens=st.integers(1, 100),
    cols=st.integers(1, 300),  # across BLOCK_COLUMNS (128)
    dtype=st.sampled_from(DTYPES),
    outputs=st.tuples(st.booleans(), st.booleans(), st.booleans()).filter(any),
    layout=st.sampled_from(["contiguous", "transposed", "expanded"]),
    programs=st.sampled_from([1, 5, 1024]),  # one chunk of tokens, several, as many as there are blocks
    seed=st.integers(0, 2**16),
)
def test_the_backward_pass_kernel_is_the_torch_ops(
    tokens: int,
    cols: int,
    dtype: torch.dtype,
    outputs: tuple[bool, bool, bool],
    layout: str,
    programs: int,
    seed: int,
) -> None:
    """``g⊙s``, ``g⊙(s − 1)`` and ``inv⊙Σ g⊙z`` from one pass equal the torch ops (any strides of ``g``)."""
    gen = _gen(seed)
    if layout == "contiguous":
        g = torch.randn(tokens, cols, generator=gen).to(DEVICE, dtype)
    elif layout == "transposed":
        g = torch.randn(cols, tokens, generator=gen).to(DEVICE, dtype).t()
    else:  # the gradient of a sum: one row, stride 0
        g = torch.randn(1, cols, generator=gen).to(DEVICE, dtype).expand(tokens, cols)
    z = torch.randn(tokens, cols, generator=gen).to(DEVICE, dtype)
    # g⊙s and g⊙(s − 1) both far from g, by more than changed_from's margin in tolerances of the result:
    # bfloat16 asks 31 (0.5 / rtol), and (s − 2) / (rtol·(s − 1)) is at least 55 for s in [9.5, 10.5]
    scale = (torch.rand(cols, generator=gen) + 9.5).to(DEVICE)
    inv = (torch.rand(cols, generator=gen) + 0.5).to(DEVICE)
    with dora_kernels_on(False):
        gz, gh, grad = scaled_gradient(g, z, scale, scale.to(dtype), inv, *outputs)
    kept = dora_kernels.TARGET_PROGRAMS
    dora_kernels.TARGET_PROGRAMS = programs
    try:
        with dora_kernels_on(True):
            k_gz, k_gh, k_grad = scaled_gradient(g, z, scale, scale.to(dtype), inv, *outputs)
    finally:
        dora_kernels.TARGET_PROGRAMS = kept
    assert (k_gz is None, k_gh is None, k_grad is None) == tuple(not o for o in outputs)
    if gz is not None:
        assert_close(k_gz, gz, changed_from=g)
    if gh is not None:
        assert_close(k_gh, gh, changed_from=g)
    if grad is not None:  # the kernel's float32 sum of exact products against the sum in float64
        exact = (g.double() * z.double()).sum(0) * inv.double()
        terms = (g.double() * z.double()).abs().sum(0) * inv.double()
        assert_close(k_grad, exact.float(), rtol=1e-5, atol=1e-5 * terms.max().item())
        assert_close(grad, exact.float(), rtol=0, atol=2 * torch.finfo(dtype).eps * terms.max().item())


class _Ops(TorchDispatchMode):
    """The names of the aten ops run."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kernels", [False, True])
def test_the_kernels_replace_the_small_norm_ops_and_the_elementwise_passes(kernels: bool) -> None:
    """With the kernels aten keeps A's cast and the two GEMMs ``W·Aᵀ``, ``A·Aᵀ`` (and, on the CPU, ``W·Aᵀ``'s
    cast to float32; on CUDA the GEMM writes float32): no ``addmm``, ``baddbmm``, clamp, rsqrt, elementwise
    pass over the activations or token ``sum``."""
    g = _gen(0)
    w, a, b = torch.randn(40, 24).bfloat16(), torch.randn(4, 24, generator=g), torch.randn(40, 4, generator=g)
    grad, z, sq, m = torch.randn(30, 40).bfloat16(), torch.randn(30, 40).bfloat16(), torch.rand(40) + 9, torch.rand(40)
    w, a, b, grad, z, sq, m = (t.to(DEVICE) for t in (w, a, b, grad, z, sq, m))
    writes_float32(w.device)  # its one-time probe (an addmm among its ops) before the ops are counted
    with dora_kernels_on(kernels), _Ops() as ops:
        inv, scale, half, _, _ = row_scales(w, a, b, sq, m, 2.0)
        scaled_gradient(grad, z, scale, half, inv, True, True, True)
    replaced = {"addmm", "baddbmm", "clamp_min_", "rsqrt_", "mul", "mul_", "sub", "sum"}
    assert bool(replaced & set(ops.names)) != kernels, ops.names
    if kernels:
        assert (ops.names.count("mm"), ops.names.count("_to_copy")) == (2, 1 if GPU else 2), ops.names


def test_the_kernels_compile_for_hopper() -> None:
    """Every dtype and output combination the node launches compiles to an H100 binary (sm_90), as a first
    launch there compiles it: Triton's compiler and ptxas need no GPU (in a process without the interpreter,
    which changes how Triton's language builds)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import dora_helpers; print(dora_helpers.compile_for_hopper())"
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=Path(__file__).parent, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["10"], run.stdout  # bf16 and fp16: 1 row-scale kernel, 4 backward-pass kernels
