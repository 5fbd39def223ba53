"""The one-pass Triton kernel for LoRA's two output-gradient products, against float64 products.

On the CPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set before the kernel is
jitted, so in a child process); the interpreter reads no bfloat16, so float16 stands for the half
precisions there, and bfloat16 is checked on a CUDA device.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from grafting.testing import assert_close
from grafting_lora.skinny_kernels import output_grad_products, output_grad_products_reference

CHECK = textwrap.dedent(
    """
    import torch
    from grafting_lora.skinny_kernels import _kernel_applies, output_grad_products

    torch.manual_seed(0)
    for tokens, out, rank, scaling in [(100, 70, 4, 0.5), (64, 64, 16, 2.0), (130, 200, 24, 1.0), (7, 300, 1, 3.0)]:
        g = torch.randn(tokens, out, dtype=torch.float16)
        b = torch.randn(out, rank, dtype=torch.float16)
        low = torch.randn(tokens, rank, dtype=torch.float16)
        assert _kernel_applies(g, b, low)
        grad_low, grad_b = output_grad_products(g, b, low, scaling, torch.float32)
        want_low = scaling * g.double() @ b.double()
        want_b = scaling * g.double().t() @ low.double()
        assert grad_low.dtype == torch.float16 and grad_b.dtype == torch.float32
        assert grad_low.shape == want_low.shape and grad_b.shape == want_b.shape
        err_low = ((grad_low.double() - want_low).norm() / want_low.norm()).item()
        err_b = ((grad_b.double() - want_b).norm() / want_b.norm()).item()
        assert err_low < 2e-3 and err_b < 1e-5, (tokens, out, rank, err_low, err_b)
    print("ok")
    """
)


def test_kernel_in_the_interpreter_matches_float64_products() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b_dtype", [torch.float32, torch.bfloat16])
def test_reference_and_cpu_path(dtype: torch.dtype, b_dtype: torch.dtype) -> None:
    """On CPU tensors without the interpreter the kernel is not taken: the two matmuls give the values."""
    torch.manual_seed(1)
    g, b, low = torch.randn(33, 20, dtype=dtype), torch.randn(20, 5, dtype=dtype), torch.randn(33, 5, dtype=dtype)
    grad_low, grad_b = output_grad_products(g, b, low, 0.25, b_dtype)
    assert grad_low.dtype == dtype
    assert grad_b.dtype == b_dtype
    assert_close(grad_low, (0.25 * g.double() @ b.double()).to(dtype))
    coarse = torch.bfloat16 if torch.bfloat16 in (dtype, b_dtype) else dtype  # a half-precision product
    assert_close(grad_b.to(coarse), (0.25 * g.double().t() @ low.double()).to(coarse))
    same = output_grad_products_reference(g, b, low, 0.25, b_dtype)
    torch.testing.assert_close(grad_low, same[0], rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_on_cuda(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    for tokens, out, rank in [(8192, 2048, 16), (1000, 333, 7), (4096, 5632, 64)]:
        g = torch.randn(tokens, out, device="cuda", dtype=dtype)
        b = torch.randn(out, rank, device="cuda", dtype=dtype)
        low = torch.randn(tokens, rank, device="cuda", dtype=dtype)
        grad_low, grad_b = output_grad_products(g, b, low, 2.0, torch.float32)
        want_low, want_b = 2.0 * g.double() @ b.double(), 2.0 * g.double().t() @ low.double()
        assert ((grad_low.double() - want_low).norm() / want_low.norm()).item() < 1e-2
        assert ((grad_b.double() - want_b).norm() / want_b.norm()).item() < 1e-5
