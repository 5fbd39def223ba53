"""A weight ``W + Σ s·L·R`` that multiplies in low-rank form: LoRA on expert tensors without forming ``ΔW``.

A mixture-of-experts layer reads its 3-D expert tensor ``(experts, m, n)`` inside its own forward:
it picks one expert (``weight[e]``) or gathers a few (``weight[ids]``), may transpose it, and hands
it to ``F.linear``, ``@``/``matmul``, ``bmm`` or ``torch._grouped_mm``. :class:`LowRankWeight` stands
for ``W + Σ_k s_k·L_k·R_k`` (``L_k`` ``(…, m, r)``, ``R_k`` ``(…, r, n)``, the same leading dims as
``W``) and answers each of those operations without forming ``ΔW``:

* indexing over the leading (expert) dims indexes ``W``, ``L`` and ``R`` alike;
* a transpose of the last two dims gives ``Wᵀ + s·Rᵀ·Lᵀ``;
* a product with ``x`` is the base product plus ``(x·L)·R·s`` (``x·Wᵀ + (x·Rᵀ)·Lᵀ·s`` for
  ``F.linear``), for ``torch._grouped_mm`` over the same groups (offsets) as the base product, so
  each routed token meets only its expert's factors;
* shape, dtype and device queries read ``W``.

Any other operation sees the dense ``W + ΔW`` (:meth:`LowRankWeight.dense`): always correct, only
slower. The low-rank products run in the dtype :func:`grafting.toolkit.compute_dtype` gives for the
input (a bf16 input: bf16 products, the float32 factors cast down once per forward and shared by
every expert's view); gradients reach the factors (and ``W`` if it trains) through ordinary ops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from grafting.toolkit import compute_dtype
from grafting_lora.grouped_low_rank import grouped_low_rank

#: One step applied to a term's factors after their cast: ``("index", idx)`` or ``("transpose", None)``.
Step = tuple[str, Any]


class Term:
    """``s·L·R`` for one adapter: the factors as the adapter holds them, and the views taken since.

    ``left`` is ``(…, m, r)``, ``right`` ``(…, r, n)``. The cast (and scaled) factors are made once per
    dtype and shared by every term derived from this one (``cache``), so the per-expert views of one
    forward cost no cast each.
    """

    __slots__ = ("cache", "left", "right", "scaling", "steps")

    def __init__(
        self,
        left: torch.Tensor,
        right: torch.Tensor,
        scaling: float,
        steps: tuple[Step, ...] = (),
        cache: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        self.left, self.right, self.scaling, self.steps = left, right, scaling, steps
        self.cache = {} if cache is None else cache

    def then(self, step: Step) -> Term:
        return Term(self.left, self.right, self.scaling, (*self.steps, step), self.cache)

    def factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L, R·s)`` in ``dtype``, with this term's views applied."""
        if dtype not in self.cache:
            self.cache[dtype] = (self.left.to(dtype), (self.right * self.scaling).to(dtype))
        return _viewed(*self.cache[dtype], self.steps)

    def views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L, R)`` as the adapter holds them (no cast, no scaling), with this term's views applied."""
        return _viewed(self.left, self.right, self.steps)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """``s·L·R`` formed in the factors' dtype, then cast to ``dtype``."""
        left, right = self.views()
        return (torch.matmul(left, right) * self.scaling).to(dtype)


def _viewed(left: torch.Tensor, right: torch.Tensor, steps: tuple[Step, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    for kind, arg in steps:
        if kind == "index":
            left, right = left[arg], right[arg]
        else:
            left, right = right.mT, left.mT
    return left, right


def _transposes_last_two(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], ndim: int) -> bool:
    """Whether ``func(weight, *args)`` swaps the weight's last two dims and nothing else."""
    if func in (torch.Tensor.mT.__get__, torch.Tensor.mH.__get__):
        return True
    if func in (torch.Tensor.T.__get__, torch.Tensor.H.__get__, torch.Tensor.t, torch.t):
        return ndim == 2
    if func in (torch.Tensor.transpose, torch.transpose):
        dims = [*args[1:], *kwargs.values()]
        return (
            len(dims) == 2
            and all(isinstance(d, int) for d in dims)
            and {d % ndim for d in dims} == {ndim - 2, ndim - 1}
        )
    if func in (torch.Tensor.permute, torch.permute):
        dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        dims = [d % ndim for d in dims] if all(isinstance(d, int) for d in dims) else []
        return dims == [*range(ndim - 2), ndim - 1, ndim - 2]
    return False


def _batch_index(index: Any, batch_dims: int) -> bool:
    """Whether ``weight[index]`` selects over the leading ``batch_dims`` dims only (ints, slices, index tensors)."""
    items = index if isinstance(index, tuple) else (index,)
    used = 0
    for item in items:
        if isinstance(item, torch.Tensor):
            if item.dtype == torch.bool:
                used += item.ndim
            elif not item.is_floating_point() and not item.is_complex():
                used += 1
            else:
                return False
        elif isinstance(item, (int, slice)) and not isinstance(item, bool):
            used += 1
        else:
            return False
    return 0 < used <= batch_dims


_METADATA = frozenset(
    {
        "size",
        "dim",
        "ndimension",
        "numel",
        "nelement",
        "stride",
        "data_ptr",
        "is_contiguous",
        "element_size",
        "storage_offset",
        "get_device",
        "is_floating_point",
        "is_complex",
        "__len__",
    }
)
_PRODUCTS = {
    torch.matmul: False,
    torch.Tensor.matmul: False,
    torch.Tensor.__matmul__: False,
    torch.Tensor.__rmatmul__: True,  # (weight, x): x @ weight
    torch.mm: False,
    torch.Tensor.mm: False,
    torch.bmm: False,
    torch.Tensor.bmm: False,
}


class LowRankWeight(torch.Tensor):
    """``W + Σ s·L·R`` read as a tensor of ``W``'s shape, dtype and device; products in low-rank form.

    Build one with :meth:`of`. ``precision`` is that of :func:`grafting.toolkit.compute_dtype`.
    """

    _weight: torch.Tensor
    _terms: tuple[Term, ...]
    _precision: str

    @staticmethod
    def of(weight: torch.Tensor, terms: Sequence[Term], precision: str = "input") -> LowRankWeight:
        """``weight + Σ terms``; a ``LowRankWeight`` given as ``weight`` gets the terms added to its own."""
        if isinstance(weight, LowRankWeight):
            terms = (*weight._terms, *terms)
            weight = weight._weight
        made = torch.Tensor._make_subclass(LowRankWeight, weight.detach(), False)
        made._weight, made._terms, made._precision = weight, tuple(terms), precision
        return made

    def dense(self) -> torch.Tensor:
        """``W + ΔW`` formed (the fallback of every operation without a low-rank form)."""
        weight = self._weight
        for term in self._terms:
            weight = weight + term.dense(weight.dtype)
        return weight

    def _derived(self, weight: torch.Tensor, step: Step | None) -> LowRankWeight:
        terms = self._terms if step is None else tuple(t.then(step) for t in self._terms)
        return LowRankWeight.of(weight, terms, self._precision)

    def _low_rank(self, x: torch.Tensor, product: Callable[..., torch.Tensor], *, first: bool) -> torch.Tensor | None:
        """``Σ product(product(x, L), R)`` (``first``: x on the left) or ``Σ product(L, product(R, x))``."""
        dtype = compute_dtype(self._precision, self._terms[0].left.dtype, x, where="LoRA")
        x = x.to(dtype)
        total: torch.Tensor | None = None
        for term in self._terms:
            left, right = term.factors(dtype)
            part = product(product(x, left), right) if first else product(left, product(right, x))
            total = part if total is None else total + part
        return total

    @classmethod
    def __torch_function__(
        cls, func: Callable[..., Any], types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        handled = _handle(func, tuple(args), kwargs)
        if handled is not NotImplemented:
            return handled
        dense = tree_map(lambda a: a.dense() if isinstance(a, LowRankWeight) else a, (tuple(args), kwargs))
        return func(*dense[0], **dense[1])


def _plain(weight: LowRankWeight) -> torch.Tensor:
    return weight._weight


def _handle(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``func(*args, **kwargs)`` in low-rank form, or ``NotImplemented`` (the caller forms ``W + ΔW``)."""
    weight = args[0] if args and isinstance(args[0], LowRankWeight) else None
    if weight is not None:
        ndim = weight._weight.ndim
        if _transposes_last_two(func, args, kwargs, ndim):
            return weight._derived(weight._weight.transpose(-2, -1), ("transpose", None))
        if func is torch.Tensor.__getitem__ and _batch_index(args[1], ndim - 2):
            return weight._derived(weight._weight[args[1]], ("index", args[1]))
        if getattr(func, "__name__", "") == "__get__" or getattr(func, "__name__", "") in _METADATA:
            return func(_plain(weight), *args[1:], **kwargs)
        if func in (torch.Tensor.to, torch.Tensor.contiguous):
            moved = func(weight._weight, *args[1:], **kwargs)
            if moved.device != weight._weight.device:
                return NotImplemented
            return weight._derived(moved, None)
    if func in _PRODUCTS:
        return _product(func, args, kwargs, swap=_PRODUCTS[func])
    if func is F.linear:
        return _linear(*args, **kwargs)
    if func is torch._grouped_mm:
        return _grouped(*args, **kwargs)
    return NotImplemented


def _product(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], *, swap: bool) -> Any:
    if len(args) != 2 or kwargs:
        return NotImplemented
    a, b = (args[1], args[0]) if swap else args
    op = torch.bmm if func in (torch.bmm, torch.Tensor.bmm) else torch.matmul
    if isinstance(b, LowRankWeight) and not isinstance(a, LowRankWeight):
        base = op(a, b._weight)
        low = b._low_rank(a, op, first=True)
    elif isinstance(a, LowRankWeight) and not isinstance(b, LowRankWeight):
        base = op(a._weight, b)
        low = a._low_rank(b, op, first=False)
    else:
        return NotImplemented
    return base + low.to(base.dtype)  # type: ignore[union-attr]


def _linear(x: Any, weight: Any, bias: Any = None) -> Any:
    if not isinstance(weight, LowRankWeight) or isinstance(x, LowRankWeight) or isinstance(bias, LowRankWeight):
        return NotImplemented
    if weight._weight.ndim != 2:
        return NotImplemented
    base = F.linear(x, weight._weight, bias)
    dtype = compute_dtype(weight._precision, weight._terms[0].left.dtype, x, where="LoRA")
    h = x.to(dtype)
    for term in weight._terms:
        left, right = term.factors(dtype)
        base = base + F.linear(F.linear(h, right), left).to(base.dtype)
    return base


def _grouped(mat_a: Any, mat_b: Any, offs: Any = None, bias: Any = None, out_dtype: Any = None) -> Any:
    """``torch._grouped_mm(x, W + ΔW, offs)`` as the base product plus ``(x·L)·R·s`` over the same groups, each
    term one node (:mod:`grafting_lora.grouped_low_rank`), added into the base product in place."""
    if not isinstance(mat_b, LowRankWeight) or isinstance(mat_a, LowRankWeight) or mat_b._weight.ndim != 3:
        return NotImplemented
    if mat_a.ndim != 2 or offs is None:
        return NotImplemented
    base = torch._grouped_mm(mat_a, mat_b._weight, offs=offs, bias=bias, out_dtype=out_dtype)
    dtype = compute_dtype(mat_b._precision, mat_b._terms[0].left.dtype, mat_a, where="LoRA")
    x = mat_a.to(dtype)
    for term in mat_b._terms:
        left, right = term.views()
        base = base.add_(grouped_low_rank(x, left, right, offs, term.scaling).to(base.dtype))
    return base
