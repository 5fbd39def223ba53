"""``add_weighted_adapter``: a new adapter made from existing ones, for any method whose plugin can combine.

The core checks the request, asks the ``grafting_combine_adapters`` hook for
a :class:`Combination` (the new adapter's config, derived by the plugin, and
how to fill its tensors), creates the adapter through the ordinary
``add_adapter`` path, and lets the plugin fill it layer by layer from the
source adapters found there. A failure leaves the model without the new
adapter, as it was.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
import torch

from grafting.config.adapter_config import AdapterConfig
from grafting.errors import CombinationError, GraftingWarning
from grafting.protocol import Combination, CombineRequest
from grafting.registry.plugins import get_method, get_registry

if TYPE_CHECKING:
    from grafting.model.tuner import AdapterModel


def union_of_targets(values: Sequence[list[str] | str], what: str = "target_modules") -> list[str] | str:
    """One module-name option covering all of ``values``: the union of lists (first-seen order), or of regexes.

    Lists and regex strings do not mix (a :class:`CombinationError`), as in PEFT.
    """
    if all(isinstance(v, str) for v in values):
        unique = list(dict.fromkeys(values))
        return unique[0] if len(unique) == 1 else "|".join(f"({v})" for v in unique)  # type: ignore[return-value]
    if any(isinstance(v, str) for v in values):
        raise CombinationError(
            f"the adapters give {what} as a mix of regex strings and lists of names, which cannot be combined;"
            " give them all in one form"
        )
    return list(dict.fromkeys(name for v in values for name in v))


def add_weighted_adapter(
    tuner: AdapterModel,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> None:
    """Add ``adapter_name``, the combination of ``adapters`` with ``weights`` (see ``AdapterModel``'s method)."""
    if adapter_name in tuner.peft_config:
        warnings.warn(
            f"add_weighted_adapter: the model already holds an adapter named {adapter_name!r}; nothing was added"
            " (as in PEFT)",
            GraftingWarning,
            stacklevel=3,
        )
        return
    names = [adapters] if isinstance(adapters, str) else list(adapters)
    if not names:
        raise CombinationError("add_weighted_adapter needs at least one adapter to combine")
    for name in names:
        tuner.require_adapter(name)
    if len(set(names)) != len(names):
        raise CombinationError(f"add_weighted_adapter: adapters {names} name an adapter twice")
    values = list(weights)
    if len(values) != len(names) or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in values):
        raise CombinationError(
            f"add_weighted_adapter: weights must be one number per adapter ({len(names)}), got {weights!r}"
        )
    _check_saved_modules(tuner, names)
    request = CombineRequest(
        adapters=tuple(names),
        configs=tuple(_resolved_targets(tuner, tuner.peft_config[n]) for n in names),
        weights=tuple(float(w) for w in values),
        combination_type=combination_type,
        svd_rank=svd_rank,
        svd_clamp=svd_clamp,
        svd_full_matrices=svd_full_matrices,
        svd_driver=svd_driver,
        density=density,
        majority_sign_method=majority_sign_method,
    )

    registry, combination = get_registry(), None
    for peft_type in dict.fromkeys(str(c.peft_type) for c in request.configs):  # the sources' methods, in order
        combination = registry.call(
            get_method(peft_type), "grafting_combine_adapters", request=request, model=tuner.model
        )
        if combination is not None:
            break
    if combination is None:
        raise CombinationError(
            f"add_weighted_adapter: no installed plugin combines {request.peft_types()} adapters"
            f" (combination_type={combination_type!r})"
        )
    tuner.add_adapter(adapter_name, combination.config)
    try:
        with torch.no_grad():
            _fill_everywhere(tuner, combination, names, request.weights, adapter_name)
    except BaseException:
        tuner.delete_adapter(adapter_name)
        raise


def _resolved_targets(tuner: AdapterModel, config: AdapterConfig) -> AdapterConfig:
    if config.target_modules is not None:
        return config

    method = get_method(str(config.peft_type))
    defaults = get_registry().call(method, "grafting_default_target_modules", config=config, model=tuner.model)
    return config if defaults is None else attrs.evolve(config, target_modules=defaults)


def _check_saved_modules(tuner: AdapterModel, names: list[str]) -> None:
    for path, wrapper in tuner.save_wrappers():
        holders = [n for n in names if n in wrapper.modules_to_save]
        if len(holders) > 1:
            raise CombinationError(
                f"add_weighted_adapter: adapters {holders} each train their own copy of {path} (modules_to_save),"
                " which cannot be combined"
            )


def _fill_everywhere(
    tuner: AdapterModel, combination: Combination, names: list[str], weights: tuple[float, ...], new: str
) -> None:
    homes: list[Any] = [layer.adapters for _, layer in tuner.adapted_layers()] + [tuner.model_adapters]
    for home in homes:
        if new in home:
            sources = [(home[n], w) for n, w in zip(names, weights, strict=True) if n in home]
            combination.fill(home[new], sources)
    for _, wrapper in tuner.save_wrappers():  # the one source that trains this module hands its copy on
        holder = next((n for n in names if n in wrapper.modules_to_save), None)
        if new in wrapper.modules_to_save and holder is not None:
            wrapper.modules_to_save[new].load_state_dict(wrapper.modules_to_save[holder].state_dict())
