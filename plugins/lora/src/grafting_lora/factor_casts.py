"""An adapter's factors cast to the compute dtype, kept between forwards without autograd.

Inference casts ``A`` and ``B`` (float32) to the activations' half precision on every call although
they do not change. :class:`FactorCasts` keeps the cast copies, each for one state of its factor:
the factor's identity, storage, dtype, device and version counter (which every in-place write under
autograd's view bumps: an optimizer's ``add_``, ``load_state_dict``'s ``copy_``, a hot-swap), and the
number of optimizer steps taken in this process (``torch.optim``'s fused steps write without
bumping the counter). It serves only where no gradient flows (grad mode off, not compiling) and
holds plain tensors only; writes through ``.data`` bypass the counter: call :meth:`FactorCasts.clear`
after one. It lives in the adapter's ``__dict__``: not in ``state_dict``, and copies and pickles
start empty.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

_STEPS = [0]  # optimizer steps taken in this process (torch.optim's global post-step hook counts them)
_COUNTING: list[Any] = []


def _count_step(*_args: Any) -> None:
    _STEPS[0] += 1


def _count_optimizer_steps() -> None:
    """Count every ``torch.optim`` step from now on (once per process)."""
    if not _COUNTING:
        _COUNTING.append(register_optimizer_step_post_hook(_count_step))


def optimizer_steps() -> int:
    """``torch.optim`` steps taken in this process since the first call: part of any key a cache of values
    derived from trainable weights keeps (fused optimizers write the weights without bumping their versions)."""
    _count_optimizer_steps()
    return _STEPS[0]


def weight_state(weight: torch.Tensor) -> tuple[Any, ...]:
    """What a value derived from ``weight`` stays valid for: its identity, storage, dtype, device and version.

    With :func:`optimizer_steps` beside it, the key of every cache of weight-derived values here: a new
    ``Parameter`` in the weight's place, a write under autograd's view and an optimizer step all change it.
    """
    return id(weight), weight.data_ptr(), weight.dtype, weight.device, weight._version


class FactorCasts:
    """Cast copies of an adapter's factors, by name, each valid while its factor is unchanged."""

    __slots__ = ("_kept",)

    def __init__(self) -> None:
        self._kept: dict[str, tuple[tuple[Any, ...], torch.Tensor]] = {}

    def cast(self, name: str, factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``factor`` in ``dtype``: the kept copy where its factor is unchanged, else a new one (kept if allowed)."""
        if factor.dtype == dtype:
            return factor
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or type(factor) not in (torch.Tensor, nn.Parameter):
            return factor.to(dtype)
        key = (weight_state(factor), optimizer_steps(), dtype)
        kept = self._kept.get(name)
        if kept is not None and kept[0] == key:
            return kept[1]
        cast = factor.to(dtype)
        self._kept[name] = (key, cast)
        return cast

    def clear(self) -> None:
        """Drop every kept copy (after writing a factor through ``.data``, which the version counter misses)."""
        self._kept.clear()

    def __len__(self) -> int:
        return len(self._kept)

    def __deepcopy__(self, memo: dict[int, Any]) -> FactorCasts:
        return FactorCasts()  # a copy's factors are other tensors: nothing kept carries over

    def __reduce__(self) -> tuple[type[FactorCasts], tuple[()]]:
        return FactorCasts, ()  # pickles (torch.save of a module) keep no copies


def factor_casts(owner: object) -> FactorCasts:
    """The :class:`FactorCasts` of ``owner`` (an adapter module), made on first use in its ``__dict__``."""
    kept = owner.__dict__.get("_factor_casts")
    if kept is None:
        kept = owner.__dict__["_factor_casts"] = FactorCasts()
    return kept
