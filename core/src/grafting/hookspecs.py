"""Hook specifications: the contract between the core and a method plugin.

A plugin implements any of these with ``@grafting.hookimpl`` and is listed
under the ``grafting`` entry-point group. ``create_*`` and
``default_target_modules`` are *firstresult* hooks: the first non-``None``
answer wins, so a plugin answers ``None`` for configs or layers it does not
handle, and a more specific plugin can take precedence with ``tryfirst=True``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from torch import Tensor, nn

    from grafting.combine import Combination, CombineRequest
    from grafting.config import AdapterConfig
    from grafting.layer import LayerAdapter
    from grafting.method import Method
    from grafting.model_adapter import ModelAdapter

PROJECT = "grafting"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def grafting_methods() -> list[Method]:
    """Return the methods this plugin provides (called once, at discovery)."""
    raise NotImplementedError


@hookspec(firstresult=True)
def grafting_create_layer_adapter(
    config: AdapterConfig, base_layer: nn.Module, adapter_name: str, module_name: str, model: nn.Module
) -> LayerAdapter | None:
    """Build the adapter that ``config`` puts on ``base_layer``.

    ``module_name`` is the dotted path of the layer in ``model`` (for
    per-module options such as ``rank_pattern``); ``model`` is the whole
    model, for options that depend on its type (an implementation may leave
    the argument out of its signature). Return ``None`` when this
    plugin does not handle ``config.peft_type`` or this layer type. The
    adapter is created on the base layer's device; it must not modify
    ``base_layer``.
    """


@hookspec(firstresult=True)
def grafting_create_model_adapter(config: AdapterConfig, model: nn.Module, adapter_name: str) -> ModelAdapter | None:
    """Build the model-level adapter for ``config``, or return ``None``."""


@hookspec(firstresult=True)
def grafting_default_target_modules(config: AdapterConfig, model: nn.Module) -> list[str] | str | None:
    """Name the modules to adapt when ``config.target_modules`` is ``None``.

    Usually looked up by ``model.config.model_type``; ``None`` if unknown.
    """


@hookspec(firstresult=True)
def grafting_dense_weight(layer: nn.Module) -> Tensor | None:
    """The weight of a layer that stores it in a non-float form (quantized), dequantized.

    Return it as a floating-point (out, in·k) matrix, the layout of
    :func:`grafting.weights.weight_matrix`; return ``None`` for layers this
    plugin does not know. Called only for weights that are not floating point.
    """


@hookspec(firstresult=True)
def grafting_store_weight(layer: nn.Module, matrix: Tensor) -> bool | None:
    """Store a floating-point (out, in·k) ``matrix`` as the weight of such a layer (requantize it).

    Return ``True`` when done, ``None`` for layers this plugin does not know.
    """


@hookspec(firstresult=True)
def grafting_check_saved_shapes(config: AdapterConfig, shapes: dict[str, tuple[int, ...]]) -> list[str] | None:
    """Check a saved adapter's tensor shapes against its config (used by ``grafting inspect``).

    ``shapes`` maps each key of the weights file (PEFT's on-disk names) to its
    shape. Return one line per inconsistency (an empty list when everything
    fits), or ``None`` when this plugin does not handle ``config``. Keys of
    ``modules_to_save`` copies may be present and are not the plugin's concern.
    """


@hookspec(firstresult=True)
def grafting_combine_adapters(request: CombineRequest, model: nn.Module) -> Combination | None:
    """Combine existing adapters into a new one (``add_weighted_adapter``).

    ``request`` names the source adapters, their configs (``target_modules``
    resolved), their weights, ``combination_type`` and its options. Return
    ``None`` when this plugin does not handle these configs (say, not all
    of its method); otherwise a :class:`~grafting.combine.Combination`: the
    new adapter's config, which the core adds like any other, and
    ``fill(target, sources)``, which the core calls (without gradients)
    wherever the new adapter sits, with the source adapters found there and
    their weights, to write the new adapter's tensors. Raise
    :class:`~grafting.errors.CombinationError` for a request this plugin
    handles but refuses (an unknown ``combination_type``, a missing
    ``density``). Pure tensor combiners are in :mod:`grafting.merge_utils`.
    """
