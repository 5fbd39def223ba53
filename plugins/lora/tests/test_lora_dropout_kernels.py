"""LoRA-with-dropout's Triton node (:mod:`grafting_lora.dropout_kernels`): its cases and its fallback.

The kernels' cases (:mod:`dropout_kernel_cases`) run in child processes, since Triton decorates
kernels for its interpreter or its compiler once per process: with ``TRITON_INTERPRET=1`` where
there is no GPU (values, gradients and the mask's statistics), and without it (every kernel
compiled for an H100 by Triton's bundled ptxas). The fallback is checked here, in-process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from grafting.model.layer import AdaptedLayer
from grafting_lora import dropout_kernels
from grafting_lora.layers import LoraLinear

CASES = Path(__file__).with_name("dropout_kernel_cases.py")
ROOT = Path(__file__).parents[3]


def _run_cases(selection: str, interpret: bool) -> None:
    """``pytest`` on the cases matching ``selection`` in a fresh process; its report on failure."""
    env = dict(os.environ)  # "0" set explicitly: the repository's conftest turns the interpreter on where unset
    env["TRITON_INTERPRET"] = "1" if interpret and not torch.cuda.is_available() else "0"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", str(CASES)]
    done = subprocess.run([*command, "-k", selection], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, (
        f"{' '.join(command)} -k '{selection}' failed:\n{done.stdout[-6000:]}{done.stderr[-2000:]}"
    )
    assert " passed" in done.stdout
    assert "skipped" not in done.stdout


@pytest.mark.slow
def test_the_kernels_equal_the_torch_formula_with_their_mask() -> None:
    """Values and gradients against the torch node with the kernels' mask; keep rates; seeds (interpreter on CPU)."""
    _run_cases("not compiles", interpret=True)


@pytest.mark.slow
def test_the_kernels_compile_for_an_h100() -> None:
    """Every kernel and gradient variant compiles to an sm_90 binary, no GPU needed."""
    _run_cases("compiles", interpret=False)


def test_the_layer_keeps_the_torch_node_off_cuda() -> None:
    """Off CUDA the layer's dropout stays in the torch node (the reference), and Triton is not imported for it."""
    torch.manual_seed(0)
    base = nn.Linear(24, 20).to(torch.float16).requires_grad_(False)
    layer = AdaptedLayer(base)
    layer.add_adapter("a", LoraLinear(base, 4, 1.5, dropout=0.3, init=False))
    layer.set_active(["a"])
    layer.train()
    x = torch.randn(6, 24, dtype=torch.float16)
    assert not dropout_kernels.serves(x, layer.adapters["a"].lora_A.weight)
    assert type(layer(x).grad_fn).__name__ == "LoraLinearFunctionBackward"
    assert "grafting_lora._dropout_triton" not in sys.modules
