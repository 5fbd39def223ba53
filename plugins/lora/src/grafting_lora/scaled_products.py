"""Matrix products with their scale and their output dtype inside the GEMM: one kernel where the device allows.

``α·x·y`` written in some dtype takes a product and an elementwise pass (scale, cast) in the obvious form;
the GEMM's epilogue can do both. :func:`scaled_product` asks for that: ``alpha`` through ``addmm``'s
``alpha`` (with ``beta = 0``, the input ignored), a float32 result of half-precision factors through
``out_dtype`` where the device has the kernel (CUDA's cuBLAS; :func:`writes_float32` checks once per
device type and never raises), else the product and one kernel that scales and casts together.
"""

from __future__ import annotations

import torch

#: Device types whose half-precision products write float32 (``out_dtype``), found by :func:`writes_float32`.
_WIDE: dict[str, bool] = {}


def writes_float32(device: torch.device) -> bool:
    """Whether half-precision products on ``device`` write float32 with a scale (``mm``/``addmm`` ``out_dtype``).

    Probed once per device type (a tiny product whose float32 value bf16 cannot hold, with ``alpha`` and
    a NaN input that ``beta = 0`` must ignore); any failure answers ``False``. CPU and meta answer
    ``False`` (no such kernel); while compiling or capturing a CUDA graph the answer is ``False`` and
    the question is asked again later.
    """
    known = _WIDE.get(device.type)
    if known is False:
        return False
    if torch.compiler.is_compiling():  # a traced graph keeps the portable form
        return False
    if known is not None:
        return known
    if device.type in ("cpu", "meta"):
        _WIDE[device.type] = False
        return False
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    _WIDE[device.type] = _probe(device)
    return _WIDE[device.type]


def _probe(device: torch.device) -> bool:
    """A float32 product of bf16 factors (3 + 2/256: between two bf16 values), plain and halved."""
    try:
        x = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16, device=device)
        y = torch.tensor([[3.0], [1.0 / 256]], dtype=torch.bfloat16, device=device)
        plain = torch.mm(x, y, out_dtype=torch.float32)
        ignored = torch.full((), float("nan"), dtype=torch.bfloat16, device=device).as_strided((1, 1), (0, 0))
        halved = torch.addmm(ignored, x, y, beta=0, alpha=0.5, out_dtype=torch.float32)
        values = (plain.dtype, halved.dtype, plain.item(), halved.item())
    except Exception:  # no kernel, no keyword (older torch), a driver error: the portable form
        return False
    return values == (torch.float32, torch.float32, 3.0078125, 1.50390625)


_HALF = (torch.bfloat16, torch.float16)


def mul_as(x: torch.Tensor, y: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """``x * y`` written in ``dtype``: the product and the cast as one kernel."""
    return torch.mul(x, y, out=x.new_empty(x.shape, dtype=dtype))


def scaled_product(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, alpha: float = 1.0) -> torch.Tensor:
    """``alpha·x·y`` (2-D ``x``, ``y`` of one dtype) written in ``dtype``: one GEMM where it can be.

    In ``x``'s dtype, or float32 from half precision where :func:`writes_float32`: one kernel
    (``addmm``'s ignored input is a zero-stride view of ``x``: nothing allocated). Otherwise the product
    rounds to ``x``'s dtype and one kernel scales and casts it.
    """
    shape = (x.shape[0], y.shape[1])
    if dtype == x.dtype:
        return x @ y if alpha == 1.0 else torch.addmm(x.as_strided(shape, (0, 0)), x, y, beta=0, alpha=alpha)
    if (
        dtype == torch.float32
        and x.dtype in _HALF
        and _WIDE.get(x.device.type) is not False
        and writes_float32(x.device)
    ):
        if alpha == 1.0:
            return torch.mm(x, y, out_dtype=dtype)
        return torch.addmm(x.as_strided(shape, (0, 0)), x, y, beta=0, alpha=alpha, out_dtype=dtype)
    product = x @ y
    if alpha == 1.0:
        return product.to(dtype)
    return mul_as(product, alpha, dtype)
