"""DoRA's Triton kernels switched on or off for a test: compiled on CUDA tensors where a GPU is, else in
Triton's interpreter on CPU tensors."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from grafting_lora import dora_kernels

GPU = torch.cuda.is_available()
#: Where the kernel tests put their tensors: the GPU's compiled kernels, or the CPU's interpreter.
DEVICE = "cuda" if GPU else "cpu"


@contextlib.contextmanager
def dora_kernels_on(on: bool) -> Iterator[None]:
    """With ``on``, :mod:`grafting_lora.dora_kernels` runs its Triton kernels (interpreted on CPU tensors where
    no GPU is); without, its torch ops. Restored after."""
    if on and not GPU:  # the interpreter is chosen when triton is imported: the repository's conftest.py sets it
        assert os.environ.get("TRITON_INTERPRET") == "1", "TRITON_INTERPRET=1 must be set before triton is imported"
    kept = dora_kernels.USE_TRITON, dora_kernels.INTERPRETED
    dora_kernels.USE_TRITON, dora_kernels.INTERPRETED = on, on and not GPU
    try:
        yield
    finally:
        dora_kernels.USE_TRITON, dora_kernels.INTERPRETED = kept


def compile_for_hopper() -> int:
    """Compile each of the kernels the node launches (every dtype, every output combination) for an H100
    (sm_90) with Triton's compiler and ptxas, no GPU needed; how many compiled. Run without ``TRITON_INTERPRET``."""
    import triton
    from triton.backends.compiler import GPUTarget

    assert dora_kernels._import_triton()  # the kernels' module imports Triton on first use: their globals now
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    hopper = GPUTarget("cuda", 90, 32)
    compiled = 0
    for t in ("bf16", "fp16"):
        ptrs = {"p_ptr": "fp32", "gram_ptr": "fp32", "b_ptr": "fp32", "sq_ptr": "fp32", "m_ptr": "fp32"}
        ptrs |= {"inv_ptr": "fp32", "scale_ptr": "fp32", "half_ptr": t, "up_ptr": t}
        signature = {name: f"*{kind}" for name, kind in ptrs.items()}
        signature |= {"rows": "i32", "rank": "i32", "scaling": "fp32"}
        constants = {"BLOCK_ROWS": dora_kernels.BLOCK_ROWS, "BLOCK_RANK": 16}
        signature |= {name: "constexpr" for name in constants}
        source = ASTSource(JITFunction(dora_kernels._row_scales_source), signature, constants)
        compiled += bool(triton.compile(source, target=hopper).asm["cubin"])
        for outputs in ((True, False, True), (False, False, True), (True, True, True), (True, True, False)):
            ptrs = {"g_ptr": t, "z_ptr": t, "scale_ptr": "fp32", "inv_ptr": "fp32", "gz_ptr": t, "gh_ptr": t}
            signature = {name: f"*{kind}" for name, kind in ptrs.items()} | {"part_ptr": "*fp32"}
            signature |= {n: "i32" for n in ("tokens", "cols", "stride_gt", "stride_gc", "stride_zt", "chunk")}
            constants = dict(zip(("WRITE_GZ", "WRITE_GH", "REDUCE"), outputs, strict=True))
            constants |= {"BLOCK_T": dora_kernels.BLOCK_TOKENS, "BLOCK_C": dora_kernels.BLOCK_COLUMNS}
            signature |= {name: "constexpr" for name in constants}
            source = ASTSource(JITFunction(dora_kernels._scaled_gradient_source), signature, constants)
            compiled += bool(triton.compile(source, target=hopper).asm["cubin"])
    return compiled
