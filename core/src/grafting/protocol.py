"""The plugin author's manual: everything a method plugin implements, in one module.

A method plugin is a module of hook implementations (``@grafting.hookimpl``)
listed under the ``grafting`` entry-point group. It declares its methods
(:func:`grafting_methods`) and builds, for each adapter a user adds, either

* **layer adapters**, one per targeted module, each a subclass of
  :class:`InputAdapter`, :class:`DeltaAdapter`, :class:`OutputAdapter` or
  :class:`WeightAdapter` (its :class:`Site`); optionally with one :class:`SharedState` per adapter
  that all its layer adapters read, or
* one **model adapter** (:class:`ModelAdapter`) that rewrites the model's call.

The core composes adapters by site (ARCHITECTURE.md, section 3), saves and
loads them in PEFT's format, merges them in site order; a plugin never wraps
modules itself.

**Dispatch.** A method-scoped hook (every hook below except ``grafting_methods``,
``grafting_dense_weight``, ``grafting_store_weight`` and ``grafting_parameter_count``) reaches only the object
that serves the config's method: :attr:`Method.hooks`, or the plugin that declared
the method when it gives none. Plugins that declare no method at all (extensions:
a quantized layer type for an existing method, a shape checker) see every
method's calls and answer ``None`` for those they do not extend, with
``tryfirst=True`` to take precedence. A method's own hooks never check the
config's class. Like every pluggy hook, an implementation lists only the
arguments it uses.

Call order when a user adds an adapter (``get_peft_model``, ``add_adapter``,
``from_pretrained``, ``load_adapter``); every step may raise, and nothing is
installed until all succeeded::

    config.for_model(model) -> config.validate_for_model(model)      (read-only on the model)
    layer methods:  grafting_default_target_modules   (only if target_modules is None)
                    matching, then config.select_targets(model, names)
                    grafting_create_shared_state       (once, every target)
                    grafting_create_layer_adapter      (once per target, model order)
    model methods:  grafting_create_model_adapter      (once)
    install:        each LayerAdapter.attach(base_layer), the only step that may write the base

The create hooks of one such call share one :class:`AdapterContext`: its
``state`` dict is where one hook call leaves what a later one needs (an
embedding's adapter for the tied head built after it), never a module global.

**Config methods a plugin overrides** (on its :class:`grafting.AdapterConfig`
subclass; defaults in ``grafting.config.adapter_config``), each called by the core:

==============================  =============================================================================
``for_model(model)``            before validation: a copy with model-dependent values filled (PEFT saves them)
``validate_for_model(model)``   before matching: raise :class:`ConfigError` for options the model cannot take
``select_targets(model, names)``after matching: keep or add modules among the matched logical names
``trainable_base_parameters``   ``(model, adapted_paths)`` -> base parameter names the method trains and saves
``ties_weights()``              ``True`` when the method ties adapters of tied embeddings (``ensure_weight_tying``)
``trains_token_rows()``         ``True`` when the adapter trains and saves single embedding rows (LoRA's tokens)
``is_adaption_prompt``          class attribute, PEFT's flag: ``True`` on the adaption prompt config only
``as_update_of_base``           ``(tensors, initial)`` -> config and tensors against the original base (PiSSA)
``inert_keys``                  ``{key: PEFT's default}`` of PEFT options not implemented (other values refused)
``absent_in_peft``              shared options PEFT's class lacks: written only when set
``pattern_fields``              ``rank_pattern``-style fields whose keys must match an adapted module
==============================  =============================================================================

**Layer-adapter methods** beyond ``forward``: ``merge``/``unmerge`` (merge phase,
in site order), ``check_merge`` (before any weight changes), ``attach``
(install), ``delta_matrix`` (the effect as one ``ΔW``, read by other methods'
combination and conversion code), ``fused_call``/``add_delta``/``add_grouped``/``grouped_call``
(fast paths of the composition; each must equal it up to rounding), a delta adapter's
``input_factor`` (shared-input grouping: its first product computed in one matmul with its
sibling layers'), ``pad_rank``/``hotswap_values`` (hot-swap into a compiled model: every layer
method implements both, helpers in :mod:`grafting.toolkit`; a :class:`SharedState` with tensors
implements them too), ``hotswap_blank_values`` (the values that leave a layer without effect, for a
swapped-in adapter that targets a subset of the loaded one's layers; optional).

**The meta device.** ``from_pretrained``, ``load_adapter`` and
``low_cpu_mem_usage=True`` call the ``create`` hooks under
``torch.device("meta")``: tensors created without an explicit device are
meta tensors (no memory, no values) that the saved file then fills. A tensor
the file does not hold (a non-persistent buffer, a projection regenerated
from a seed) must be created with an explicit ``device="cpu"``; the core
moves every adapter to its base layer's device and dtype. After loading,
any parameter or buffer still on meta is an :class:`AdapterLoadError`.
Outside of loading they are created on the default device and then moved.

**Names.** An adapter names its parameters and buffers as PEFT names them on
disk: the saved key of a layer adapter's tensor is
``base_model.model.<module path>.<its state_dict key>``; of a shared state's
``base_model.<its state_dict key>``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import pluggy
import torch
from torch import nn

from grafting.errors import AdapterStateError, BeyondPeftWarning, MergeError
from grafting.registry.method import Method

if TYPE_CHECKING:
    from grafting.config import AdapterConfig

PROJECT = "grafting"
hookspec = pluggy.HookspecMarker(PROJECT)
#: Marks a plugin's hook implementation: ``@grafting.hookimpl`` (``tryfirst=True`` to take precedence).
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- combining adapters (add_weighted_adapter) ------------------------------------------------
#: ``fill(target, sources)``: write the new adapter ``target`` from ``[(source adapter, weight), ...]``, the
#: source adapters present where ``target`` sits (a layer, or the model for model-level adapters).
Fill = Callable[[nn.Module, list[tuple[nn.Module, float]]], None]


@attrs.frozen(kw_only=True)
class CombineRequest:
    """What ``add_weighted_adapter`` was asked for, handed to the ``grafting_combine_adapters`` hook.

    ``configs`` are the source adapters' configs, in the order of ``adapters``,
    with ``target_modules`` resolved (a ``None`` replaced by the method's
    default for the model). The options after ``combination_type`` are PEFT's
    (``svd_*`` for the SVD-based types, ``density`` and
    ``majority_sign_method`` for the pruning ones); a plugin refuses those it
    cannot honour with a :class:`~grafting.errors.CombinationError`.
    """

    adapters: tuple[str, ...]
    configs: tuple[AdapterConfig, ...]
    weights: tuple[float, ...]
    combination_type: str = "svd"
    svd_rank: int | None = None
    svd_clamp: float | None = None
    svd_full_matrices: bool = True
    svd_driver: str | None = None
    density: float | None = None
    majority_sign_method: str = "total"

    def peft_types(self) -> list[str]:
        return sorted({c.peft_type for c in self.configs})


@attrs.frozen
class Combination:
    """A plugin's answer: the config of the new adapter and the function that fills its tensors."""

    config: AdapterConfig
    fill: Fill


# -- where a layer adapter acts ------------------------------------------------------------
class Site(enum.IntEnum):
    """Where a layer adapter acts; the order is the composition (and merge) order."""

    WEIGHT = 0
    INPUT = 1
    DELTA = 2
    OUTPUT = 3


class LayerCall:
    """What a delta adapter may need besides its input: the base layer and its call.

    ``base_out`` is the base layer's output (element 0 for a tuple) before any
    delta. ``args``/``kwargs`` are the layer's call for the whole batch; under
    per-sample routing ``x`` and ``base_out`` hold only the batch rows ``rows``
    (``None`` otherwise), so an adapter that reads per-sample tensors from
    the call takes those rows.
    """

    __slots__ = ("args", "base_layer", "base_out", "kwargs", "rows")

    def __init__(
        self,
        base_layer: nn.Module,
        args: tuple,
        kwargs: dict,
        base_out: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> None:
        self.base_layer = base_layer
        self.args = args
        self.kwargs = kwargs
        self.base_out = base_out
        self.rows = rows


class SharedState(nn.Module):
    """Tensors one adapter shares among all its layer adapters (VeRA's projections, a vector bank).

    Built once per adapter by :func:`grafting_create_shared_state`, held by the
    core, handed to every layer adapter of that adapter, which keeps it with
    :meth:`LayerAdapter.use_shared`. Its ``state_dict()`` keys are saved as
    ``base_model.<key>``: register a buffer with ``persistent=False`` to keep
    it out of the file. Its parameters train when the adapter trains. It may
    not name a tensor ``model.*``.

    Training-time behaviour of a whole adapter (AdaLoRA's orthogonality
    regulariser and rank allocation) lives here too: two optional methods the
    core calls with ``layers``, this adapter's layer adapters by logical module
    name in model order. Both default to nothing.
    """

    def loss_term(self, layers: dict[str, LayerAdapter]) -> torch.Tensor | None:
        """A scalar the core adds to the model's ``outputs.loss``, or ``None`` (the default).

        Asked on every forward of ``PeftModel`` whose output carries a ``loss`` tensor,
        for each active adapter that is trainable while the adapters are enabled.
        """
        return None

    def on_optimizer_step(self, layers: dict[str, LayerAdapter], global_step: int) -> None:
        """Called after each optimizer step, before the gradients are zeroed; default: nothing.

        ``global_step`` counts the optimizer steps done before this one (0 on the first).
        The core calls it for every trainable adapter from ``base_model.update_and_allocate(step)``
        (PEFT's name, for a custom loop) and from grafting's ``Trainer`` on its own.
        """

    def pad_rank(self, rank: int) -> None:
        """Grow the shared tensors to ``rank`` with zeros, the adapter's effect unchanged (as
        :meth:`LayerAdapter.pad_rank`). Default: nothing for a state without tensors, else refuse."""
        if any(True for _ in self.buffers()) or any(True for _ in self.parameters()):
            raise AdapterStateError(f"{type(self).__name__} does not support hot-swapping (no pad_rank)")

    def hotswap_values(self, tensors: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
        """The values of this state's tensors (``state_dict(keep_vars=True)`` keys, non-persistent buffers
        included) that a saved adapter of the same method gives them (``tensors``: the file's shared tensors,
        by key without ``base_model.``; ``config``: its config). Pure; the core copies them in place, as for
        :meth:`LayerAdapter.hotswap_values`. Default: ``{}`` for a state without tensors, else refuse."""
        if any(True for _ in self.buffers()) or any(True for _ in self.parameters()) or tensors:
            raise AdapterStateError(f"{type(self).__name__} does not support hot-swapping (no hotswap_values)")
        return {}


@attrs.define(eq=False)
class AdapterContext:
    """One ``add_adapter`` call as the method's create hooks see it (also given to them as ``context``).

    ``targets`` maps each module the adapter will wrap (logical name) to its base layer, in
    model order (empty for model-level methods); ``shared`` is the adapter's shared state once
    :func:`grafting_create_shared_state` made one. ``state`` is the plugin's own scratch space
    for this call: what one hook call leaves for a later one (an embedding's adapter for the
    tied head created after it). It is dropped when the call ends.
    """

    config: AdapterConfig
    model: nn.Module
    adapter_name: str
    targets: dict[str, nn.Module] = attrs.field(factory=dict)
    shared: SharedState | None = None
    state: dict[str, Any] = attrs.field(factory=dict)


class LayerAdapter(nn.Module):
    """One adapter of one method on one layer; subclass one of the four site classes.

    Parameters and buffers are named as PEFT names them on disk. The core
    places the adapter on its base layer's device (float32 for a half-precision
    base unless ``autocast_adapter_dtype=False``) and never calls ``forward``
    on a merged adapter.
    """

    site: ClassVar[Site]
    #: False for an adapter that cannot be folded into the weights (adaption prompt): merging it is a MergeError.
    mergeable: ClassVar[bool] = True
    #: True when ``merge`` computes from the weight it merges into, not only adds to it (DoRA's
    #: row norms of ``W + ΔW``): it must see the layer's own weight, so it merges first in its
    #: layer and never together with another such adapter or an input adapter.
    reads_base_weight: bool = False
    #: True when the adapter's effect is a weight delta ``W + ΔW`` that a LoRA adapter could
    #: express (``supports_lora_conversion``); PEFT says so for LoRA, its variants and LoHa.
    lora_convertible: ClassVar[bool] = False
    #: Where PEFT's module for this adapter keeps the layer it wraps, relative to the layer's path: the
    #: key prefix of the layer's own weight in a file that saves it (``save_embedding_layers``). PEFT's
    #: tuner layers keep it at ``base_layer``; its trainable-tokens wrapper at ``token_adapter.base_layer``.
    peft_base_path: ClassVar[str] = "base_layer"
    #: False for an adapter on a layer type PEFT's version of the method refuses (the policy: a plugin
    #: may go beyond PEFT, and says so here): the core then warns with :class:`BeyondPeftWarning`
    #: when the adapter is added, since PEFT cannot load the folder it saves.
    peft_loadable: ClassVar[bool] = True
    #: The adapter's shared state, set by :meth:`use_shared` (``None`` for methods without one).
    shared: SharedState | None = None
    #: The per-adapter attributes PEFT's tuner layer has and this adapter holds under the same name
    #: (``"lora_A"``, ``"scaling"``, ``"r"``): the adapted layer answers ``layer.<name>`` with a
    #: read-only mapping ``{adapter name: adapter.<name>}`` over its adapters that declare the name
    #: and hold a value (not ``None``), as PEFT's ``layer.lora_A["default"]``. The values are the
    #: adapter's own modules and tensors, so writes in place reach them.
    peft_attributes: ClassVar[tuple[str, ...]] = ()

    def use_shared(self, shared: SharedState | None) -> None:
        """Keep ``shared`` as a plain reference (not a submodule): it is saved once, not per layer."""
        self.__dict__["shared"] = shared

    def attach(self, base_layer: nn.Module) -> None:
        """Called once when the adapter is installed on ``base_layer``; default: nothing.

        The one place an adapter may change its base layer at creation (PiSSA and
        OLoRA leave the residual ``W − ΔW₀`` there). The core calls it only after
        every target of the ``add_adapter`` call was created, so anything that can
        fail belongs in ``__init__``, which must only read the base layer.
        """

    def merge(self, base_layer: nn.Module) -> None:
        """Fold this adapter into ``base_layer``'s weights in place (read and write them through ``grafting.weights``).

        The core calls it in site order and undoes it with :meth:`unmerge` in
        reverse order; afterwards the layer's output without this adapter must
        equal its output with it before. Raise :class:`MergeError` to refuse.
        """
        raise MergeError(f"{type(self).__name__} cannot be merged into a {type(base_layer).__name__}")

    def unmerge(self, base_layer: nn.Module) -> None:
        """Take this adapter back out of ``base_layer``'s weights (the inverse of :meth:`merge`)."""
        raise MergeError(f"{type(self).__name__} cannot be unmerged from a {type(base_layer).__name__}")

    def check_merge(self, base_layer: nn.Module) -> None:
        """Raise :class:`MergeError` if :meth:`merge` into ``base_layer`` would refuse; default: nothing.

        The core asks every layer of a merge before any weight changes, so a refusal that
        depends on the layer (a head no longer sharing its weight with the embedding whose
        adapter it follows) leaves the whole model as it was. Reads, never writes.
        """

    def delta_matrix(self) -> torch.Tensor:
        """This adapter's effect as one weight delta ``ΔW`` (out, in·k), for adapters with ``lora_convertible``.

        Read, without gradients, by code of other methods and of the core that needs an
        adapter as a plain ``W + ΔW`` (LoRA's ``add_weighted_adapter`` over a mixed layer,
        conversion to LoRA). An adapter whose effect is no fixed ``ΔW`` leaves the default,
        which raises :class:`MergeError`.
        """
        raise MergeError(f"{type(self).__name__} has no weight delta of its own")

    def pad_rank(self, rank: int) -> None:
        """Grow this adapter's tensors to ``rank`` with zeros, its effect unchanged (``prepare_model_for_compiled_hotswap``).

        Called before ``torch.compile``, so that adapters of any rank up to ``rank`` can later be swapped in
        without a change of shape; a method without a rank (IA3, OFT's block sizes) leaves its tensors as they
        are. It may replace parameters (it runs before compiling and before an optimizer is built):
        :func:`grafting.toolkit.grow_tensor`. Default: refuse (the method does not hot-swap).
        """
        raise AdapterStateError(f"{type(self).__name__} does not support hot-swapping (no pad_rank)")

    def hotswap_values(
        self, tensors: dict[str, torch.Tensor], config: Any, module_name: str
    ) -> dict[str, torch.Tensor]:
        """The values of this adapter's ``state_dict`` entries that give it the effect of a saved adapter of the
        same method (``tensors``: the file's tensors for this layer, by local key; ``config``: its config).

        ``hotswap_adapter`` copies them in place, so every tensor keeps its identity, shape and dtype and a
        compiled graph stays valid; anything else the forward reads (a Python scaling) must stay as it is, so
        fold a changed scalar into a tensor. Pure: the core asks every layer before it writes any. Raise
        :class:`AdapterStateError` when the file does not fit (a larger rank, a block size, another option the
        forward reads); :func:`grafting.toolkit.fit_state` fits the saved tensors to the loaded shapes, rank
        dimensions zero-padded. Default: refuse.
        """
        raise AdapterStateError(f"{type(self).__name__} does not support hot-swapping (no hotswap_values)")

    def hotswap_blank_values(self, base_layer: nn.Module) -> dict[str, torch.Tensor]:
        """The values of this adapter's ``state_dict`` entries that leave ``base_layer`` without effect, the layer
        computing what the base layer alone does (LoRA: ``A`` and ``B`` zero; IA3: ones).

        Asked by ``hotswap_adapter`` for every layer of the loaded adapter that the new file has no tensors for
        (a new adapter that targets a subset of the loaded one's layers), before anything is written; copied in
        place as :meth:`hotswap_values`'s are. Pure: read ``base_layer``, never write it. Default: refuse (the
        method cannot leave a layer without effect, so such a file cannot swap in).
        """
        raise AdapterStateError(
            f"{type(self).__name__} cannot leave this layer without effect (no hotswap_blank_values)"
        )

    def fused_call(
        self, base_layer: nn.Module, x: torch.Tensor, product: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """``base_layer(x)`` with this adapter's effect, computed in one step, or ``None`` (the default).

        The layer asks only when this adapter is the one adapter acting on it (any site)
        and the layer was called with ``x`` alone; ``None`` makes it compose as usual
        (input adapter, base layer, delta, output adapter). An adapter that computes the
        base layer itself (one autograd node for both: LoRA's product accumulated in
        place, IA3's vector folded into the weight) returns the layer's output, equal
        to the composition's up to rounding. ``product`` is given only to a delta adapter
        that declared an :meth:`DeltaAdapter.input_factor` for this call (see there).
        """
        return None


class WeightAdapter(LayerAdapter):
    """Changes parameters of the layer for the call: ``weight_deltas(base_layer) -> {name: ΔW}``.

    For layers that use a weight where no hook sees it (``nn.MultiheadAttention``'s
    ``in_proj_weight``, the 3-D expert tensors of mixture-of-experts layers): the
    layer runs with ``W + ΔW`` in place of each named parameter (``name`` as in
    ``base_layer.named_parameters()``, ``ΔW`` in the parameter's shape), gradients
    flowing into the adapter. Merging adds ``ΔW`` in place; per-sample routing
    refuses it (the batch shares the weights).
    """

    site = Site.WEIGHT

    def weight_deltas(self, base_layer: nn.Module) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def call_weights(self, base_layer: nn.Module, current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors the layer's call reads in place of the parameters this adapter changes.

        ``current`` holds what earlier weight adapters of the layer put in place (a name missing from it is
        the base parameter). Default: ``W + ΔW`` from :meth:`weight_deltas`, cast to ``W``'s dtype. A method
        may return any tensor that stands for ``W + ΔW`` without forming ``ΔW`` (LoRA on expert tensors: a
        tensor subclass whose products with the layer's input take the low-rank form); it must equal
        ``W + ΔW`` under every operation the layer applies to it, with gradients to the adapter.
        """
        out: dict[str, torch.Tensor] = {}
        for name, delta in self.weight_deltas(base_layer).items():
            weight = current[name] if name in current else base_layer.get_parameter(name)
            out[name] = weight + delta.to(weight.dtype)
        return out

    @torch.no_grad()
    def merge(self, base_layer: nn.Module) -> None:
        for name, delta in self.weight_deltas(base_layer).items():
            param = base_layer.get_parameter(name)
            param.add_(delta.to(param.dtype))

    @torch.no_grad()
    def unmerge(self, base_layer: nn.Module) -> None:
        for name, delta in self.weight_deltas(base_layer).items():
            param = base_layer.get_parameter(name)
            param.sub_(delta.to(param.dtype))


class InputAdapter(LayerAdapter):
    """Transforms the layer's input before the base layer: ``forward(x) -> x'``, same shape and dtype.

    The input site is a multiplicative transform of the base layer's weight, ``W -> S·W·M``: ``forward``
    applies ``M``, any linear map of the input (IA3's diagonal scaling, OFT's block rotation), and
    :meth:`after_base` applies ``S``, a scaling of the output channels of the base layer's product
    ``W·M·x`` (BOFT's ``s``; the bias is left out). ``merge`` writes ``S·W·M``. Several input adapters
    act in the order they were added (the first one next to the input); the core merges them in the
    reverse order, so ``W' = W·M_k···M_1``, and refuses to merge one while another added after it
    stays active and unmerged.
    """

    site = Site.INPUT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def after_base(self, y: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """The base layer's output ``y = W·M·x + b`` with ``S`` applied to ``W·M·x``; default ``y`` unchanged."""
        return y


class DeltaAdapter(LayerAdapter):
    """Adds to the layer's output: ``forward(x, call) -> delta``.

    ``x`` is the layer's own input (before any input adapter); the delta has
    the output's shape and may be in the adapter's dtype: the core sums the
    deltas and rounds to the base output's dtype once.
    """

    site = Site.DELTA

    def forward(self, x: torch.Tensor, call: LayerCall) -> torch.Tensor:
        raise NotImplementedError

    def add_delta(
        self, y: torch.Tensor, x: torch.Tensor, call: LayerCall, product: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``y + delta(x, call)``: what the layer calls. ``y`` is the output so far.

        Override to form the sum in fewer kernels (one ``addmm`` that accumulates the
        last product into ``y``); the result must equal ``y + self(x, call)`` up to
        rounding. Never write into ``y`` in place: ``call.base_out`` may be ``y``.
        ``product`` is ``x·Fᵀ`` for the factor ``F`` this adapter declared for the call
        (:meth:`input_factor`), computed with its siblings'; ``None`` otherwise.
        """
        return y + self(x, call)

    def input_factor(self, x: torch.Tensor) -> torch.Tensor | None:
        """The matrix ``F`` (r, in) this adapter applies first to its layer's input in this call, or ``None``.

        **Shared-input grouping** (``grafting.model.grouping``). Sibling layers often read one
        tensor (q/k/v of attention, gate/up of an MLP). An adapter whose delta starts with a
        product ``x·Fᵀ`` (LoRA's ``A``; VeRA's ``diag(λ_d)·A`` could) declares ``F`` here; when
        two or more adapters of sibling layers (or of one layer) declare one for the same input
        tensor, the core computes ``x·[F_1; F_2; ...]ᵀ`` as one matmul, in ``x``'s dtype (the
        factors are cast to it), and hands each adapter its columns: ``product`` (shaped as ``x``
        with ``r`` last, a view) in :meth:`fused_call` or :meth:`add_delta`, whichever the layer
        calls; the adapter must then use it in place of computing ``x·Fᵀ`` (gradients reach
        ``F`` through the grouped product). Answer ``None`` whenever the product would differ from
        ``x·Fᵀ`` in ``x``'s dtype: dropout drawn on the input (each adapter its own mask), a wider
        compute dtype, an order of operations the adapter keeps on purpose (PEFT's float32 bits).
        Asked once per call, possibly from a sibling layer's call, while the adapter is active and
        unmerged and no per-sample routing is in force; must not change state. Default ``None``:
        the adapter is never grouped.
        """
        return None

    @classmethod
    def add_grouped(
        cls, adapters: Sequence[DeltaAdapter], y: torch.Tensor, x: torch.Tensor, index: torch.Tensor, call: LayerCall
    ) -> torch.Tensor | None:
        """Per-sample routing of several adapters of this class at once, or ``None`` (the default).

        ``index[i]`` is the position in ``adapters`` of the adapter sample ``i`` is routed
        to, or -1 for a sample routed elsewhere (which keeps its row of ``y``). Returns
        ``y`` with each routed sample's own delta added, computed for all adapters together
        (one gathered product, as multi-adapter servers batch them); ``None`` makes the
        layer apply the adapters one at a time on their rows. ``x`` is the whole batch; the
        result must not depend on calling the base layer's submodules.
        """
        return None

    @classmethod
    def grouped_call(
        cls, adapters: Sequence[DeltaAdapter], base_layer: nn.Module, x: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor | None:
        """``base_layer(x)`` plus each routed sample's own delta in one step, or ``None`` (the default).

        :meth:`add_grouped`'s counterpart of :meth:`fused_call`: the layer asks when these
        adapters are every adapter routed on it and it was called with ``x`` alone (``index``
        as there); an adapter class that computes the base layer itself (one autograd node
        for the base and the routed deltas) returns the layer's output, equal to the
        composition's up to rounding. ``None`` makes the layer call the base, then :meth:`add_grouped`.
        """
        return None


class OutputAdapter(LayerAdapter):
    """Transforms the layer's output after the base layer and the deltas: ``forward(y) -> y'``."""

    site = Site.OUTPUT

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ModelAdapter(nn.Module):
    """An adapter on the model's call instead of its layers (prompt tuning, P-tuning, prefix tuning).

    The core holds it in ``base_model.model_adapters[name]``; at most one is
    active, and it cannot be merged or routed per sample.
    """

    def prepare(self, kwargs: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        """The keyword arguments to call ``model`` with, from those given to ``PeftModel.forward``.

        A positional first argument arrives as ``input_ids``.
        """
        raise NotImplementedError

    def prepare_generate(self, kwargs: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        """The same, once, for ``generate`` (whose steps then run in transformers); default :meth:`prepare`.

        State what the first step needs in generate's terms: ``inputs_embeds``
        beside ``input_ids``, or a pre-filled cache, and a mask to match.
        """
        return self.prepare(kwargs, model)

    def finish(self, outputs: Any, kwargs: dict[str, Any]) -> Any:
        """Post-process the model's outputs (``kwargs`` are the prepared ones); default: unchanged."""
        return outputs

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors to save, keyed as PEFT saves them (``prompt_embeddings``); default ``state_dict()``."""
        return dict(self.state_dict())

    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Read back what :meth:`peft_state_dict` names (meta tensors are replaced, not copied into)."""
        self.load_state_dict(state, strict=True, assign=any(p.is_meta for p in self.parameters()))


#: What a create hook must answer, by hook name (checked by the registry, which names the plugin otherwise).
HOOK_RESULTS: dict[str, type] = {}


# -- the hooks ------------------------------------------------------------------------------
@hookspec
def grafting_methods() -> list[Method]:
    """Declare the methods this plugin provides.

    Called once, when the plugin is registered. Two plugins declaring one
    ``peft_type`` is a :class:`PluginConflictError`.

    :return: one :class:`Method` record per method.
    """
    raise NotImplementedError


@hookspec(firstresult=True)
def grafting_default_target_modules(config: AdapterConfig, model: nn.Module) -> list[str] | str | None:
    """Name the modules to adapt when ``config.target_modules`` is ``None``.

    :param config: the adapter's config.
    :param model: the user's model; look its type up with :func:`grafting.toolkit.model_type`.
    :return: module names or a regex, or ``None`` when the model type is unknown
        (the core then asks the user to set ``target_modules``).
    """


@hookspec(firstresult=True)
def grafting_create_shared_state(
    config: AdapterConfig, model: nn.Module, adapter_name: str, targets: dict[str, nn.Module], context: AdapterContext
) -> SharedState | None:
    """Build the state all of one adapter's layer adapters share, once per adapter.

    Called for layer methods after matching, before any layer adapter, under
    the meta device when loading (see the module docstring).

    :param config: the adapter's config.
    :param model: the user's model.
    :param adapter_name: the adapter's name.
    :param targets: every module the adapter will wrap, ``{logical name: base layer}`` in model order.
    :param context: this ``add_adapter`` call (:class:`AdapterContext`).
    :return: a :class:`SharedState`, or ``None`` for no shared state.
    """


@hookspec(firstresult=True)
def grafting_create_layer_adapter(
    config: AdapterConfig,
    base_layer: nn.Module,
    adapter_name: str,
    module_name: str,
    model: nn.Module,
    shared: SharedState | None,
    context: AdapterContext,
) -> LayerAdapter | None:
    """Build the adapter that ``config`` puts on ``base_layer``.

    Called once per target, in model order, after
    :func:`grafting_create_shared_state`; under the meta device when loading.
    Must not modify ``base_layer``. Answer ``None`` for layer types the method
    does not handle (an extension plugin may answer first with ``tryfirst=True``);
    if nothing answers, the user gets an :class:`UnsupportedLayerError` naming the module.

    :param config: the adapter's config.
    :param base_layer: the module to adapt (the base layer itself, even when it is already adapted).
    :param adapter_name: the adapter's name.
    :param module_name: the module's logical dotted path (for ``rank_pattern``-style options).
    :param model: the whole model (for options that depend on its type).
    :param shared: this adapter's :class:`SharedState`, or ``None``; keep it with :meth:`LayerAdapter.use_shared`.
    :param context: this ``add_adapter`` call (:class:`AdapterContext`): ``context.state`` carries data between calls.
    :return: a :class:`LayerAdapter` (weight, input, delta or output), or ``None``.
    """


@hookspec(firstresult=True)
def grafting_create_model_adapter(
    config: AdapterConfig, model: nn.Module, adapter_name: str, context: AdapterContext
) -> ModelAdapter | None:
    """Build the model-level adapter for ``config`` (methods declared with ``level="model"``).

    :param config: the adapter's config (after ``for_model``).
    :param model: the user's model.
    :param adapter_name: the adapter's name.
    :param context: this ``add_adapter`` call (:class:`AdapterContext`).
    :return: a :class:`ModelAdapter`, or ``None`` (the core then reports that no adapter was built).
    """


@hookspec(firstresult=True)
def grafting_check_saved_shapes(config: AdapterConfig, shapes: dict[str, tuple[int, ...]]) -> list[str] | None:
    """Check a saved adapter's tensor shapes against its config (``grafting inspect``).

    :param config: the saved adapter's config.
    :param shapes: every key of the weights file (PEFT's names: layer keys
        ``base_model.model.<path>.<local>``, shared keys ``base_model.<key>``)
        to its shape; keys of ``modules_to_save`` copies may be present and are
        not the plugin's concern.
    :return: one line per inconsistency (``[]`` when everything fits), or
        ``None`` when the method does not check shapes.
    """


@hookspec(firstresult=True)
def grafting_dense_weight(layer: nn.Module) -> torch.Tensor | None:
    """The weight of a layer that stores it in a non-float form (quantized), dequantized.

    Called only for weights that are not floating point, through
    :func:`grafting.toolkit.dense_weight`.

    :param layer: the base layer.
    :return: a floating-point (out, in·k) matrix, or ``None`` for layers this plugin does not know.
    """


@hookspec(firstresult=True)
def grafting_store_weight(layer: nn.Module, matrix: torch.Tensor) -> bool | None:
    """Store a floating-point (out, in·k) ``matrix`` as the weight of such a layer (requantize it).

    :param layer: the base layer.
    :param matrix: the new weight, as :func:`grafting_dense_weight` returns it.
    :return: ``True`` when stored, ``None`` for layers this plugin does not know.
    """


@hookspec(firstresult=True)
def grafting_parameter_count(param: torch.Tensor) -> int | None:
    """How many weights a parameter stores, when its storage packs several into one element.

    Called for every parameter by ``PeftModel.get_nb_trainable_parameters`` (and
    ``print_trainable_parameters``): a quantization plugin answers for its packed parameters
    (bitsandbytes' 4-bit ``Params4bit`` holds two weights per byte), so the counts are PEFT's.

    :param param: a parameter of the model.
    :return: the number of weights it holds, or ``None`` for parameters this plugin does not pack
        (they count ``param.numel()``).
    """


@hookspec(firstresult=True)
def grafting_combine_adapters(request: CombineRequest, model: nn.Module) -> Combination | None:
    """Combine existing adapters of this plugin's method into a new one (``add_weighted_adapter``).

    :param request: the source adapters, their configs (``target_modules``
        resolved), their weights, ``combination_type`` and its options.
    :param model: the user's model.
    Called for each distinct method among the sources, in the sources' order, until one
    answers: a plugin may combine its own adapters with other methods' (through
    :meth:`LayerAdapter.delta_matrix`) or answer ``None``.

    :return: ``None`` when the method does not combine adapters; otherwise a
        :class:`grafting.model.combine.Combination`: the new adapter's config, which the core adds
        like any other, and ``fill(target, sources)``, which the core calls (without
        gradients) wherever the new adapter sits, with the source adapters found there and
        their weights. Raise :class:`grafting.CombinationError` for a request this plugin
        handles but refuses (an unknown ``combination_type``). Pure tensor combiners are in
        :mod:`grafting.merge_utils`.
    """


HOOK_RESULTS.update(
    {
        "grafting_create_shared_state": SharedState,
        "grafting_create_layer_adapter": LayerAdapter,
        "grafting_create_model_adapter": ModelAdapter,
    }
)

__all__ = [
    "PROJECT",
    "AdapterContext",
    "BeyondPeftWarning",
    "Combination",
    "CombineRequest",
    "DeltaAdapter",
    "InputAdapter",
    "LayerAdapter",
    "LayerCall",
    "Method",
    "ModelAdapter",
    "OutputAdapter",
    "SharedState",
    "Site",
    "WeightAdapter",
    "hookimpl",
    "hookspec",
]
