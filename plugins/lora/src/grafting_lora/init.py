"""LoRA initializations: "A random, B zero" (:func:`init_factors`), PiSSA, OLoRA and orthogonal.

An initialization is two explicit steps. When the adapter is created it reads the base
layer only and sets the factors; what it must write to the base layer is returned as an
:class:`Initialization` (kept on the adapter), which ``LoraLinear.attach`` applies once the
adapter is installed — after every target of the ``add_adapter`` call was created, so a
failing target leaves the model as it was. PiSSA and OLoRA start the adapter on a rank-r
piece of the base weight and leave the rest (the residual ``W − scaling·B·A``) in the base
layer, so the model computes the same function at the start; LoftQ (loftq.py) stores its
quantized weight, CorDA (corda.py) leaves a residual and drops its decomposition.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import attrs
import torch
from torch import nn

from grafting import ConfigError
from grafting.toolkit import dense_weight, in_out_features, store_weight

#: Values of ``init_lora_weights`` besides True/False/"gaussian" that grafting implements.
RESIDUAL_INITS = ("pissa", "olora")
PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
#: Initializations whose factors come from elsewhere: LoftQ (loftq.py), EVA (eva.py, after creation,
#: from data), CorDA (corda.py, from ``preprocess_corda``'s decomposition).
OTHER_INITS = ("loftq", "eva", "corda")
#: PEFT's initializations grafting does not implement (yet).
NOT_IMPLEMENTED = ("lora_ga", "mica")


def check_init(value: object) -> None:
    """Raise ConfigError unless ``value`` is an ``init_lora_weights`` grafting implements."""
    if value is True or value is False or value in ("gaussian", "orthogonal", *RESIDUAL_INITS, *OTHER_INITS):
        return
    if isinstance(value, str) and PISSA_NITER.fullmatch(value):
        return
    hint = " (a PEFT initialization grafting does not implement)" if value in NOT_IMPLEMENTED else ""
    raise ConfigError(
        "LoraConfig.init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_<n>', 'olora',"
        f" 'orthogonal', 'loftq', 'eva' or 'corda', got {value!r}{hint}"
    )


def rewrites_base(init: object) -> bool:
    """True for initializations that leave a residual in the base weight (PiSSA, OLoRA)."""
    return isinstance(init, str) and (init in RESIDUAL_INITS or PISSA_NITER.fullmatch(init) is not None)


def init_factors(a: torch.Tensor, b: torch.Tensor, init: bool | str, r: int) -> None:
    """A random, B zero (so the adapter starts as the identity), unless ``init`` is False (both random).

    The other string initializations set both factors themselves (:func:`start_from`), drawing no
    numbers here; EVA draws A and keeps B zero until its data step.
    """
    if isinstance(init, str) and init not in ("gaussian", "eva"):
        return
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(a, std=1 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            nn.init.zeros_(b)


def _work_dtype(weight: torch.Tensor) -> torch.dtype:
    """float64 weights are decomposed in float64; everything else in float32, as PEFT does."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def pissa(weight: torch.Tensor, r: int, scaling: float, niter: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) from the top ``r`` singular triplets of ``weight`` (out, in): ``scaling·B·A`` is that rank-r part.

    ``niter`` selects the randomized low-rank SVD with that many subspace iterations (fast, approximate).
    """
    w = weight.to(_work_dtype(weight))
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(w, q=r, niter=niter)
        vh = v.T
    root = torch.sqrt(s / scaling)
    return root[:, None] * vh, u * root[None, :]


def olora(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) from the QR decomposition ``W = Q R``: B the first ``r`` columns of Q, A the first ``r`` rows of R."""
    q, rr = torch.linalg.qr(weight.to(_work_dtype(weight)))
    return rr[:r].contiguous(), q[:, :r].contiguous()


def orthogonal(n_in: int, n_out: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with orthogonal row spaces, so ``B·A = 0`` while both train from random values (r even)."""
    if r % 2:
        raise ConfigError(f"LoraConfig.init_lora_weights='orthogonal' needs an even rank, got r={r}")
    basis, _ = torch.linalg.qr(torch.randn(r, r))
    a = (torch.randn(n_in, r // 2) @ basis[0::2]).T / 10.0
    b = torch.randn(r // 2, n_out).T @ basis[1::2] / 10.0
    return a.contiguous(), b.contiguous()


def decompose(
    init: str, weight: torch.Tensor, r: int, scaling: float, n_in: int, n_out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) for the string initialization ``init`` of a linear layer with dense (out, in) ``weight``."""
    if init == "orthogonal":
        return orthogonal(n_in, n_out, r)
    if init == "olora":
        return olora(weight, r, scaling)
    found = PISSA_NITER.fullmatch(init)
    return pissa(weight, r, scaling, int(found.group(1)) if found else None)


def residual_of(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W − scaling·B·A`` for a dense (out, in) ``weight``, computed as PEFT does and rounded once to its dtype."""
    work = _work_dtype(weight)
    return (weight.to(work) - scaling * b.to(work) @ a.to(work)).to(weight.dtype)


@torch.no_grad()
def subtract_initial_delta(base_layer: nn.Module, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
    """Leave the residual ``W − scaling·B·A`` in ``base_layer``."""
    store_weight(base_layer, residual_of(dense_weight(base_layer), a, b, scaling))


@attrs.define(eq=False)
class Initialization:
    """What an initialization writes to the base layer, computed at creation and applied by ``attach``.

    Applied once, in this order: the residual ``W − scaling·B·A`` (PiSSA, OLoRA, CorDA), the
    stored ``base_weight`` (LoftQ's quantized and dequantized ``W``), then ``then(base_layer)``.
    """

    #: Leave ``W − scaling·B·A`` in the base, so the model starts as it was.
    residual: bool = False
    #: An (out, in) weight to store in the base instead of its own.
    base_weight: torch.Tensor | None = None
    #: Called with the base layer once it is written (CorDA forgets its decomposition).
    then: Callable[[nn.Module], None] | None = None

    @torch.no_grad()
    def apply(self, base_layer: nn.Module, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """Write the base layer's side of the initialization, for the adapter's factors ``a``, ``b``."""
        if self.residual:
            subtract_initial_delta(base_layer, a, b, scaling)
        if self.base_weight is not None:
            store_weight(base_layer, self.base_weight)
        if self.then is not None:
            self.then(base_layer)


def initialize(adapter: nn.Module, base_layer: nn.Module, init: str, r: int, scaling: float) -> None:
    """Give a linear LoRA adapter the factors of the string initialization ``init`` (reads the base only)."""
    n_in, n_out = in_out_features(base_layer)
    a, b = decompose(init, dense_weight(base_layer), r, scaling, n_in, n_out)
    start_from(adapter, base_layer, a, b, residual=rewrites_base(init))


def start_from(
    adapter: nn.Module,
    base_layer: nn.Module,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    residual: bool = False,
    new_base: torch.Tensor | None = None,
    then: Callable[[nn.Module], None] | None = None,
) -> None:
    """Set a linear adapter's factors and its :class:`Initialization` (``residual``, ``new_base``, ``then``).

    Reads the base only, so a later failing target of the same ``add_adapter`` call leaves the model as it was.
    """
    dtype = adapter.lora_A.weight.dtype if not adapter.lora_A.weight.is_meta else a.dtype
    adapter.lora_A.weight = nn.Parameter(a.to(dtype))
    adapter.lora_B.weight = nn.Parameter(b.to(dtype))
    adapter.initialization = Initialization(residual=residual, base_weight=new_base, then=then)
    if adapter.use_dora and not adapter.lora_A.weight.is_meta:
        # DoRA's magnitude: the norms of the weight the forward sees, W_res + s·B·A (W up to rounding)
        weight = dense_weight(base_layer) if new_base is None else new_base
        adapter.reset_magnitude(residual_of(weight, a, b, adapter.scaling) if residual else weight)
