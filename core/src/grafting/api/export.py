"""Export adapters whose effect is a weight change as one plain LoRA adapter, for PEFT and for serving stacks.

Any layer adapter that can merge (LoRA with DoRA, LoHa, LoKr, IA3, VeRA, ... and several of them stacked on
one layer in a mixed model) has an effective weight ``W'``: the weight its layer would hold after a merge.
The export merges a float64 copy of each adapted layer (the protocol's ``merge``; the model is not touched),
takes ``ΔW = W' − W`` and factors it by a truncated SVD into ``B·A`` (scaling 1: ``lora_alpha = r``), to a
given rank, an energy threshold (PEFT's float ``rank``) or a given relative error. Each layer's error is
reported: ``relative`` is ``‖ΔW − B·A‖_F / ‖ΔW‖_F`` and ``spectral`` the largest singular value left out,
which bounds the layer's output error: ``‖(ΔW − B·A)·x‖ ≤ spectral · ‖x‖`` for every input ``x``.

Layers of three kinds export, each in PEFT's LoRA layout (:class:`Layout`): linear layers (``nn.Linear``,
``Conv1D``), convolutions (``nn.Conv1d/2d/3d``, groups of 1: ``lora_A`` a convolution with the layer's kernel,
``lora_B`` a 1×1 one, so ``ΔW`` is factored as an (out, in·k) matrix) and embeddings (``lora_embedding_A``
(r, num), ``lora_embedding_B`` (dim, r), ``ΔW`` the transposed table's change). For an embedding the spectral
error bounds each looked-up row's error; for a convolution, each output position's error per unit norm of
its input patch.

``serving="vllm"``/``"sglang"`` also meets what those servers load: no DoRA, bias or ``modules_to_save``,
LoRA on the decoder's linear projection layers only (embeddings and convolutions are refused: vLLM's
embedding LoRA is tied to its extra-vocabulary machinery and differs across versions and model classes,
SGLang loads none, and neither loads a LoRA convolution), and (vLLM) one rank for every layer, from
:data:`VLLM_RANKS`, reached by zero padding. What cannot be met is an :class:`ExportError` naming it.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import torch
from torch import nn
from tqdm.auto import tqdm

from grafting.errors import ExportError, MergeError
from grafting.io.files import CONFIG_DIGEST_KEY, SAFETENSORS_NAME, atomic_write_text, config_digest, write_weights
from grafting.io.state_dict import tuner_of
from grafting.io.transaction import inside, save_transaction
from grafting.model.layer import AdaptedLayer
from grafting.model.matching import candidate_modules, logical_path
from grafting.model.weights import dense_weight, is_hf_conv1d
from grafting.registry.dispatch import get_peft_config

#: The ranks vLLM accepts for a LoRA adapter (``max_lora_rank`` choices).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: Projection layers of the decoder blocks that vLLM's and SGLang's models take LoRA on (Llama, Mistral, Qwen,
#: Gemma, Phi-3 names and GPT-2/NeoX/Falcon-style ones); embeddings and the output head are not among them.
SERVED_MODULES = frozenset(
    {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "qkv_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "gate_up_proj",
        "c_attn",
        "c_proj",
        "c_fc",
        "query_key_value",
        "dense",
        "dense_h_to_4h",
        "dense_4h_to_h",
        "fc1",
        "fc2",
        "out_proj",
        "w1",
        "w2",
        "w3",
    }
)


@attrs.frozen
class Serving:
    """What a serving stack loads: the ranks it accepts (``None``: any) and whether every layer needs the same one."""

    name: str
    ranks: tuple[int, ...] | None
    uniform_rank: bool


SERVERS = {
    "vllm": Serving("vLLM", VLLM_RANKS, uniform_rank=True),
    "sglang": Serving("SGLang", None, uniform_rank=True),
}


@attrs.frozen
class Layout:
    """How PEFT's LoRA stores one layer kind: the keys of A and B, and their shapes from the (out, in·k) factors."""

    kind: str
    a_key: str
    b_key: str

    def tensors(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{A key: A, B key: B}`` for ``a`` (r, in·k) and ``b`` (out, r), shaped as PEFT's layer holds them."""
        if self.kind == "conv":
            kernel = kernel_shape(base)
            ones = (1,) * (len(kernel) - 2)
            a = a.reshape(a.shape[0], *kernel[1:])  # a convolution with the layer's kernel
            b = b.reshape(*b.shape, *ones)  # a 1×1 convolution
        return {self.a_key: a.contiguous(), self.b_key: b.contiguous()}


LINEAR = Layout("linear", "lora_A.weight", "lora_B.weight")
CONV = Layout("conv", "lora_A.weight", "lora_B.weight")
EMBEDDING = Layout("embedding", "lora_embedding_A", "lora_embedding_B")
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def kernel_shape(base: nn.Module) -> tuple[int, ...]:
    """The shape of a convolution's kernel (out, in, *kernel)."""
    weight = base.weight
    assert isinstance(weight, torch.Tensor)
    return tuple(weight.shape)


def layout_of(base: nn.Module) -> Layout | None:
    """The LoRA layout of a base layer, ``None`` for one a plain LoRA adapter cannot hold."""
    if isinstance(base, nn.Linear) or is_hf_conv1d(base):
        return LINEAR
    if isinstance(base, nn.Embedding):
        return EMBEDDING
    if isinstance(base, CONVS) and base.groups == 1:
        return CONV
    return None


@attrs.frozen
class LayerExport:
    """One exported layer: its logical name, the rank it got and the error of the rank-r approximation."""

    name: str
    rank: int
    relative: float
    spectral: float
    norm: float


@attrs.frozen
class LoraExport:
    """The exported adapter: a LoRA config, its tensors (PEFT's keys) and the per-layer errors."""

    config: Any
    tensors: dict[str, torch.Tensor]
    layers: list[LayerExport]

    @property
    def max_relative_error(self) -> float:
        return max((layer.relative for layer in self.layers), default=0.0)

    def report(self) -> str:
        """One line per layer: name, rank, relative and spectral error."""
        width = max((len(layer.name) for layer in self.layers), default=5)
        lines = [f"{'layer':<{width}}  rank  rel. error  spectral   ‖ΔW‖"]
        for layer in self.layers:
            lines.append(
                f"{layer.name:<{width}}  {layer.rank:>4}  {layer.relative:>10.2e}  {layer.spectral:>8.2e}"
                f"  {layer.norm:.2e}"
            )
        return "\n".join(lines)


def export_lora(
    model: nn.Module,
    rank: int | float | None = None,
    adapter_name: str | Sequence[str] = "default",
    *,
    max_error: float | None = None,
    serving: str | None = None,
    progressbar: bool = False,
) -> LoraExport:
    """``adapter_name`` (one name, or several stacked on the same layers of a mixed model) as one plain LoRA.

    ``rank``: an int is the rank of every layer; a float in (0, 1] is PEFT's energy threshold (the smallest
    rank whose singular values hold that fraction of ``‖ΔW‖²``). ``max_error``: the smallest rank whose
    relative error is at most this. ``serving``: ``"vllm"`` or ``"sglang"`` (see the module's docstring).
    """

    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    choose = _rank_rule(rank, max_error)
    server = _server(serving)
    if server is not None and server.ranks is not None and isinstance(rank, int) and rank > max(server.ranks):
        raise ExportError(f"{server.name} loads ranks up to {max(server.ranks)}; this export needs rank {rank}")
    tuner = tuner_of(model)
    for name in names:
        tuner.require_adapter(name)
    configs = [tuner.peft_config[n] for n in names]
    _check_options(configs, names, server)
    layers = [
        (logical_path(tuner.model, p), layer) for p, layer in tuner.adapted_layers() if set(names) & set(layer.adapters)
    ]
    if not layers:
        raise ExportError(f"adapter(s) {names} hold no layer adapter: nothing changes a weight, nothing to export")
    _check_layers(layers, server)
    found: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (name, U·√S, √S·Vh) at the full rank

    reports: list[LayerExport] = []
    picked: list[int] = []
    for name, layer in tqdm(layers, desc="exporting to LoRA", unit="layer", disable=not progressbar):
        delta = weight_delta(layer, [n for n in names if n in layer.adapters], name)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = choose(s)
        found.append((name, u * s.sqrt(), s.sqrt()[:, None] * vh))
        picked.append(k)
        reports.append(_errors(name, s, k))
    ranks = _serving_ranks(picked, server, rank if isinstance(rank, int) else None)
    tensors: dict[str, torch.Tensor] = {}
    dtype = _adapter_dtype(tuner, names)
    for (name, left, right), (_, layer), k, r in zip(found, layers, picked, ranks):
        b = torch.zeros(left.shape[0], r, dtype=torch.float64)
        a = torch.zeros(r, right.shape[1], dtype=torch.float64)
        b[:, :k], a[:k] = left[:, :k], right[:k]
        layout = layout_of(layer.base_layer)
        assert layout is not None  # _check_layers refused the others
        for key, value in layout.tensors(layer.base_layer, a.to(dtype), b.to(dtype)).items():
            tensors[f"base_model.model.{name}.{key}"] = value
    reports = [attrs.evolve(report, rank=r) for report, r in zip(reports, ranks)]
    config = _lora_config(tuner, configs, [n for n, _ in layers], ranks)
    return LoraExport(config, tensors, reports)


def convert_to_lora(
    model: nn.Module,
    rank: int | float,
    adapter_name: str | Sequence[str] = "default",
    progressbar: bool = False,
    compile_kwargs: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """PEFT's ``convert_to_lora``: ``(LoraConfig, state dict in PEFT's keys)``; see :func:`export_lora`.

    ``compile_kwargs`` is accepted for PEFT's signature and has no effect (the SVDs run eagerly).
    """
    exported = export_lora(model, rank, adapter_name, progressbar=progressbar)
    return exported.config, exported.tensors


def save_as_lora(
    path: str | os.PathLike[str],
    model: nn.Module,
    rank: int | float | None,
    adapter_name: str | Sequence[str] = "default",
    progressbar: bool = False,
    compile_kwargs: dict[str, Any] | None = None,
    *,
    max_error: float | None = None,
    serving: str | None = None,
) -> LoraExport:
    """PEFT's ``save_as_lora``: write the export as a LoRA adapter folder in PEFT's format; returns the export
    (with the per-layer errors). The folder is written all-or-nothing, as ``save_pretrained`` writes."""
    exported = export_lora(model, rank, adapter_name, max_error=max_error, serving=serving, progressbar=progressbar)
    write_adapter(path, exported.config, exported.tensors)
    return exported


def write_adapter(path: str | os.PathLike[str], config: Any, tensors: dict[str, torch.Tensor]) -> None:
    """A config and its tensors as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
    root = os.fspath(path)
    if os.path.isfile(root):
        raise ExportError(f"cannot write the exported adapter to {root}: it is a file, not a folder")
    data = config.to_dict()
    data["inference_mode"] = True
    text = type(config).from_dict(data).to_json_string()
    with save_transaction(root) as staging:
        digest = config_digest(json.loads(text))
        write_weights(
            tensors, inside(staging, os.path.join(staging, SAFETENSORS_NAME)), metadata={CONFIG_DIGEST_KEY: digest}
        )
        atomic_write_text(inside(staging, os.path.join(staging, "adapter_config.json")), text)


@torch.no_grad()
def weight_delta(layer: AdaptedLayer, names: list[str], where: str) -> torch.Tensor:
    """``W' − W`` in float64 for ``names`` merged into a copy of ``layer``: their effect as one matrix (out, in).

    The layer itself is not touched. An adapter that cannot merge, or a change of the bias, is an ExportError.
    """
    trial = copy.deepcopy(layer)
    trial.unmerge(layer_name=where)
    trial.double()
    base = trial.base_layer
    weight = dense_weight(base).clone()
    bias = getattr(base, "bias", None)
    bias = None if bias is None else bias.detach().clone()
    trial.set_active(names)
    try:
        trial.merge(names, layer_name=where)
    except MergeError as error:
        raise ExportError(f"{where}: {error}; only adapters whose effect is a weight change export to LoRA") from None
    if bias is not None and not torch.equal(getattr(base, "bias"), bias):  # noqa: B009 (a Tensor here, not a Module)
        raise ExportError(f"{where}: adapters {names} change the layer's bias, which a plain LoRA adapter cannot carry")
    return dense_weight(base) - weight


def _errors(name: str, s: torch.Tensor, k: int) -> LayerExport:
    total = float(s.square().sum())
    left = float(s[k:].square().sum())
    relative = math.sqrt(left / total) if total > 0 else 0.0
    return LayerExport(name, k, relative, float(s[k]) if k < len(s) else 0.0, math.sqrt(total))


def _rank_rule(rank: int | float | None, max_error: float | None) -> Any:
    """The rule that picks a layer's rank from its singular values (descending)."""
    if (rank is None) == (max_error is None):
        raise ExportError("give the export either a rank (an int, or an energy threshold in (0, 1]) or max_error")
    if max_error is not None:
        if not 0 <= max_error < 1:
            raise ExportError(f"max_error is a relative error in [0, 1), got {max_error}")
        return lambda s: _smallest(s, lambda tail, total: tail <= (max_error**2) * total)
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise ExportError(f"rank must be an int or a float threshold, got {rank!r}")
    if isinstance(rank, float):
        if not 0 < rank <= 1:
            raise ExportError(f"a float rank is an energy threshold and must be in (0, 1], got {rank}")
        return lambda s: _smallest(s, lambda tail, total: total - tail >= rank * total)
    if rank < 1:
        raise ExportError(f"rank must be at least 1, got {rank}")
    return lambda s: min(int(rank), len(s))


def _smallest(s: torch.Tensor, good: Any) -> int:
    """The smallest k >= 1 for which ``good(‖s[k:]‖², ‖s‖²)``."""
    squares = s.square()
    total = float(squares.sum())
    tails = [*squares.flip(0).cumsum(0).flip(0).tolist(), 0.0]  # tails[k] = Σ_{i >= k} s_i²
    return next(k for k in range(1, len(s) + 1) if good(tails[k], total))


def _server(serving: str | None) -> Serving | None:
    if serving is None:
        return None
    if serving not in SERVERS:
        raise ExportError(f"unknown serving stack {serving!r}; grafting knows {sorted(SERVERS)}")
    return SERVERS[serving]


def _check_options(configs: list[Any], names: list[str], server: Serving | None) -> None:
    """Options a plain LoRA adapter cannot carry: a trained copy of a module, trained biases."""
    for name, config in zip(names, configs):
        if getattr(config, "modules_to_save", None):
            raise ExportError(
                f"adapter {name!r} trains whole copies of {config.modules_to_save} (modules_to_save): that is not a"
                " weight change of low rank, and vLLM and SGLang load no modules_to_save; export without them"
            )
        bias = getattr(config, "bias", "none")
        if bias not in (None, "none") or getattr(config, "lora_bias", False):
            raise ExportError(f"adapter {name!r} trains biases (bias={bias!r}); a plain LoRA adapter carries none")


def _check_layers(layers: list[tuple[str, AdaptedLayer]], server: Serving | None) -> None:
    wrong = [f"{n} ({type(layer.base_layer).__name__})" for n, layer in layers if layout_of(layer.base_layer) is None]
    if wrong:
        raise ExportError(
            "only linear layers, embeddings and convolutions of groups=1 export to LoRA (PEFT's LoRA layers);"
            f" these are not: {_some(wrong)}"
        )
    if server is not None:
        kinds = {n: layout_of(layer.base_layer) for n, layer in layers}
        other = [f"{n} ({layout.kind})" for n, layout in kinds.items() if layout is not None and layout != LINEAR]
        if other:
            raise ExportError(
                f"{server.name} is given LoRA on linear projection layers only, not on {_some(other)}: vLLM's"
                " embedding LoRA depends on its extra-vocabulary support, which varies by version and model class,"
                " SGLang loads none, and neither loads a LoRA convolution; export without them or without serving="
            )
        unserved = [n for n, _ in layers if n.rsplit(".", 1)[-1] not in SERVED_MODULES]
        if unserved:
            raise ExportError(
                f"{server.name} takes LoRA on the decoder's projection layers only, not on {_some(unserved)};"
                " export without them (target_modules/exclude_modules) or without serving="
            )


def _serving_ranks(picked: list[int], server: Serving | None, asked: int | None) -> list[int]:
    """Each layer's rank in the file: its own, or one rank for all that the server accepts (zero padding)."""
    if server is None or not server.uniform_rank:
        return [asked if asked is not None else max(1, k) for k in picked]
    need = max([*picked, asked or 1])
    if server.ranks is None:
        return [need] * len(picked)
    allowed = [r for r in server.ranks if r >= need]
    if not allowed:
        raise ExportError(f"{server.name} loads ranks up to {max(server.ranks)}; this export needs rank {need}")
    return [allowed[0]] * len(picked)


def _adapter_dtype(tuner: Any, names: list[str]) -> torch.dtype:
    """float32, or the adapters' own wider floating dtype."""
    dtypes = {p.dtype for n in names for p in _parameters_of(tuner, n)}
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _parameters_of(tuner: Any, name: str) -> Iterable[torch.Tensor]:
    for _, layer in tuner.adapted_layers():
        if name in layer.adapters:
            yield from layer.adapters[name].parameters()


def _lora_config(tuner: Any, configs: list[Any], modules: list[str], ranks: list[int]) -> Any:
    """PEFT's LoraConfig for the exported layers: scaling 1 (alpha = r), per-layer ranks as patterns."""

    rank = max(set(ranks), key=ranks.count)
    pattern = {m: r for m, r in zip(modules, ranks) if r != rank}
    source = configs[0]
    return get_peft_config(
        {
            "peft_type": "LORA",
            "task_type": source.task_type,
            "base_model_name_or_path": source.base_model_name_or_path,
            "revision": source.revision,
            "r": rank,
            "lora_alpha": rank,
            "target_modules": _target_names(tuner.model, modules),
            "rank_pattern": pattern,
            "alpha_pattern": dict(pattern),
        }
    )


def _target_names(model: nn.Module, modules: list[str]) -> list[str]:
    """Short names (``q_proj``), as servers expect, where each covers exactly the exported layers; else full names."""

    everywhere: dict[str, set[str]] = {}
    for name, _ in candidate_modules(model):
        everywhere.setdefault(name.rsplit(".", 1)[-1], set()).add(name)
    exported = set(modules)
    by_short: dict[str, set[str]] = {}
    for name in modules:
        by_short.setdefault(name.rsplit(".", 1)[-1], set()).add(name)
    names: list[str] = []
    for short, found in sorted(by_short.items()):
        names += [short] if everywhere.get(short, set()) <= exported else sorted(found)
    return names


def _some(names: list[str], count: int = 4) -> str:
    shown = ", ".join(names[:count])
    return shown + (f" and {len(names) - count} more" if len(names) > count else "")
