"""Small random models for tests of grafting and of third-party plugins.

Each builder makes a seeded, randomly initialized transformers model a few
kilobytes large, in eval mode, so plugin authors can check their method on
the same architectures the core is tested on.

What the helpers expect of a model of your own (``model_output``,
``check_layer_adapter_invariants``): it is called with keyword inputs only
(``model(**inputs)``, a dict of tensors whose first dimension is the batch, so
``adapter_names=`` can route its rows) and returns an object with a ``.logits``
tensor (a transformers ``ModelOutput``; wrap a plain module's output in
``types.SimpleNamespace(logits=...)``). It is in eval mode, so dropout does not
make two forwards differ.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from grafting.api.peft_model import PeftModel
from grafting.errors import AdapterStateError
from grafting.io.state_dict import get_peft_model_state_dict
from grafting.io.transaction import is_bookkeeping
from grafting.model.layer import AdaptedLayer, Site
from grafting.model.routing import BASE

ARCHITECTURES = ("llama", "gpt2", "bert", "t5")


def tiny_llama(seed: int = 0, hidden: int = 16, layers: int = 2) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0, hidden: int = 16, layers: int = 2) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=64, n_embd=hidden, n_layer=layers, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0, hidden: int = 16, layers: int = 2, num_labels: int = 3) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    options: dict[str, Any] = {"num_labels": num_labels}  # a PretrainedConfig option, not a BertConfig field
    config = BertConfig(
        vocab_size=64,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        **options,
    )
    return BertForSequenceClassification(config).eval()


def tiny_t5(seed: int = 0, hidden: int = 16, layers: int = 2) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    options: dict[str, Any] = {"decoder_start_token_id": 0, "pad_token_id": 0}
    config = T5Config(
        vocab_size=64,
        d_model=hidden,
        d_kv=hidden // 2,
        d_ff=2 * hidden,
        num_layers=layers,
        num_heads=2,
        **options,
    )
    return T5ForConditionalGeneration(config).eval()


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "bert": tiny_bert,
    "t5": tiny_t5,
}


def tiny_model(arch: str, seed: int = 0, **kwargs: int) -> nn.Module:
    """A tiny random model of ``arch`` (one of :data:`ARCHITECTURES`)."""
    return BUILDERS[arch](seed=seed, **kwargs)


def sample_inputs(arch: str, batch: int = 2, length: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword arguments for one forward pass of :func:`tiny_model` ``(arch)``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (batch, length), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if arch == "t5":
        inputs["decoder_input_ids"] = torch.randint(1, 64, (batch, max(2, length // 2)), generator=gen)
    return inputs


def model_output(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The logits of a forward pass, without gradients."""
    with torch.no_grad():
        return model(**inputs).logits


def untied_tiny_gpt2(seed: int = 0) -> nn.Module:
    """:func:`tiny_gpt2` with an ``lm_head`` of its own (not tied to ``wte``): a merge there leaves ``wte`` alone."""
    from transformers import GPT2LMHeadModel

    config: Any = tiny_gpt2().config
    config.tie_word_embeddings = False
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def pixel_inputs(
    batch: int = 2, channels: int = 3, size: int = 8, seed: int = 0, dtype: torch.dtype = torch.float64
) -> dict[str, torch.Tensor]:
    """Seeded ``{"pixel_values": (batch, channels, size, size)}``: keyword inputs for a small convolutional model."""
    gen = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, channels, size, size, generator=gen, dtype=dtype)}


def logits_loss(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """A differentiable scalar of a forward pass (the sum of the squared logits), for gradient checks."""
    return model(**inputs).logits.square().sum()


# -- float64 models of a plugin's numerical tests ------------------------------------------------------------
Inputs = Any  # keyword inputs (a dict of tensors), or one tensor for a plain module


def float64_model(arch: str, seed: int = 0, conv_net: Callable[[], nn.Module] | None = None) -> nn.Module:
    """A seeded float64 model in eval mode, where rounding cannot hide a wrong formula.

    ``"conv"`` is ``conv_net()`` (a small convolutional model of your own, built after seeding torch),
    ``"gpt2-untied"`` is :func:`untied_tiny_gpt2`, any other name is :func:`tiny_model`.
    """
    if arch == "conv":
        if conv_net is None:
            raise ValueError('float64_model("conv") needs conv_net')
        torch.manual_seed(seed)
        return conv_net().to(torch.float64).eval()
    if arch == "gpt2-untied":
        return untied_tiny_gpt2(seed).to(torch.float64)
    return tiny_model(arch, seed=seed).to(torch.float64)


def float64_inputs(arch: str, seed: int = 0, pixels: tuple[int, ...] = (2, 3, 8, 8)) -> Inputs:
    """Inputs of :func:`float64_model` ``(arch)``: for ``"conv"`` one seeded float64 tensor of shape ``pixels``,
    else :func:`sample_inputs` (2 rows of 5 tokens)."""
    if arch == "conv":
        return torch.randn(*pixels, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return sample_inputs(arch.removesuffix("-untied"), batch=2, length=5, seed=seed)


def run_output(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """:func:`model_output` for keyword inputs; ``model(inputs)`` for a tensor. Without gradients."""
    if isinstance(inputs, torch.Tensor):
        with torch.no_grad():
            return model(inputs)
    return model_output(model, inputs)


def output_loss(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """A differentiable scalar of a forward pass on :func:`run_output`'s inputs: the sum of squared outputs."""
    if isinstance(inputs, torch.Tensor):
        return model(inputs).square().sum()
    return logits_loss(model, inputs)


# -- one seeded model per architecture, and the targets suites adapt on it ---------------------------------
#: The PEFT ``task_type`` of each tiny architecture's model class.
TASK_TYPES: dict[str, str] = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}
#: Per architecture: a few attention projections (``target_modules`` by leaf name).
ATTENTION_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "t5": ["q", "v"],
}
#: Per architecture: every linear (or GPT-2 ``Conv1D``) layer of the blocks, by leaf name.
LINEAR_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "key", "value", "dense"],
    "t5": ["q", "k", "v", "o", "wi", "wo"],
}
#: Per architecture: a ``target_modules`` regex that picks a few layers of some blocks only.
REGEX_TARGETS: dict[str, str] = {
    "llama": r".*\.layers\.1\.(self_attn\.(k|o)_proj|mlp\.up_proj)",
    "gpt2": r".*\.h\.\d+\.mlp\.c_(fc|proj)",
    "bert": r".*encoder\.layer\.\d+\.(attention\.self\.key|output\.dense)",
    "t5": r"(encoder|decoder)\.block\.0\..*\.(k|wo)",
}
#: The input embedding of each architecture, by leaf name. GPT-2 and T5 tie it to the output head.
INPUT_EMBEDDINGS: dict[str, str] = {
    "llama": "embed_tokens",
    "gpt2": "wte",
    "bert": "word_embeddings",
    "t5": "embed_tokens",
}
#: Architectures whose input embedding is its own weight (merging into it changes nothing else).
UNTIED_EMBEDDINGS = ("llama", "bert")


@functools.cache
def _seeded_model(arch: str) -> nn.Module:
    return tiny_model(arch)


def base_model(arch: str, dtype: torch.dtype | None = None) -> nn.Module:
    """A fresh copy of the seeded :func:`tiny_model` of ``arch`` (built once per process), in ``dtype`` if given.

    Float64 copies make the tightest checks of merging and routing: float32's rounding, which
    random adapters amplify, can neither hide a wrong result nor fake one there.
    """
    model = copy.deepcopy(_seeded_model(arch))
    return model if dtype is None else model.to(dtype)


def batch_inputs(arch: str, batch: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """:func:`sample_inputs` of ``batch`` rows of 5 tokens: the batch :func:`logits` runs."""
    return sample_inputs(arch, batch=batch, length=5, seed=seed)


def logits(model: nn.Module, arch: str, batch: int = 3, **kwargs: Any) -> torch.Tensor:
    """:func:`model_output` of ``model`` on :func:`batch_inputs` (with extra keyword inputs, e.g. ``adapter_names``)."""
    return model_output(model, {**batch_inputs(arch, batch), **kwargs})


def base_logits(arch: str, batch: int = 3, dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`logits` of the plain :func:`base_model` of ``arch``: what a disabled or no-op adapter must give."""
    return logits(_seeded_model(arch) if dtype is None else base_model(arch, dtype), arch, batch)


def loss_inputs(arch: str) -> dict[str, torch.Tensor]:
    """:func:`batch_inputs` with labels (class ids for BERT, the tokens otherwise), for a real loss."""
    batch = batch_inputs(arch)
    if arch == "bert":
        batch["labels"] = torch.tensor([0, 2, 1])
    elif arch == "t5":
        batch["labels"] = batch["decoder_input_ids"]
    else:
        batch["labels"] = batch["input_ids"]
    return batch


def state_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``module.state_dict()``: compare it after an operation that should restore it."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def saved_files(folder: str | os.PathLike[str]) -> list[str]:
    """The files of a saved adapter folder (sorted paths relative to it), less the lock grafting keeps there."""
    out = []
    for root, _, names in os.walk(folder):
        out += [os.path.relpath(os.path.join(root, n), folder) for n in names if not is_bookkeeping(n)]
    return sorted(out)


def check_save_load_round_trip(
    model: PeftModel,
    rebuild: Callable[[], nn.Module],
    run: Callable[[nn.Module], torch.Tensor],
    folder: str | os.PathLike[str],
    safe_serialization: bool = True,
) -> None:
    """``model`` (a PeftModel with its ``"default"`` adapter) saved and loaded back onto ``rebuild()`` is the same.

    The folder holds exactly PEFT's three files; the loaded model computes ``run(model)`` (up to rounding,
    and far from the bare base's ``run(rebuild())``), holds bit-identical adapter tensors and the same config
    (``inference_mode`` set), and is in eval mode with nothing trainable. Randomize the adapter first.
    """
    out = run(model)
    model.save_pretrained(folder, safe_serialization=safe_serialization)
    weights = "adapter_model.safetensors" if safe_serialization else "adapter_model.bin"
    assert saved_files(folder) == sorted(["README.md", "adapter_config.json", weights])
    loaded = PeftModel.from_pretrained(rebuild(), folder)
    assert_close(run(loaded), out, changed_from=run(rebuild()), msg="reloaded output")
    assert_identical(get_peft_model_state_dict(loaded), get_peft_model_state_dict(model), "adapter tensors")
    config = model.peft_config["default"].to_dict()
    assert loaded.peft_config["default"].to_dict() == {**config, "inference_mode": True}
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())


def edit_saved_config(folder: str | os.PathLike[str], **changes: Any) -> None:
    """Rewrite the ``adapter_config.json`` saved in ``folder`` with ``changes``: a file as a user or another
    tool might leave it, for tests of what loading refuses."""
    path = os.path.join(folder, "adapter_config.json")
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    data.update(changes)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh)


# -- the PEFT oracle ------------------------------------------------------------------------------------------
def oracle_config(config: Any) -> Any:
    """The PEFT config with the same ``adapter_config.json`` content as a grafting config (needs ``peft``)."""
    import peft

    data = config.to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_config(data)


def oracle_model(arch: str, config: Any, adapter_name: str = "default") -> Any:
    """PEFT's ``get_peft_model`` of :func:`oracle_config` on a fresh :func:`base_model` of ``arch`` (needs ``peft``)."""
    import peft

    return peft.get_peft_model(base_model(arch), oracle_config(config), adapter_name=adapter_name)


# -- the numerics policy ----------------------------------------------------------------------------
# Two kinds of comparison, and nothing else:
#
# * assert_identical: bitwise, for pure data movement -- tensors that were copied, saved, loaded,
#   restored exactly or never touched. Nothing was computed, so any difference is a bug.
# * assert_close: a tolerance derived from the dtype, for anything a matrix product (or any other
#   reduction) computed. The same product over the same values may round differently in the last
#   bits from one code path, kernel, thread count or memory address to the next (an AMD EPYC with
#   AVX-512 and oneDNN does, where an Intel Xeon happened not to), so a bitwise check there tests
#   the CPU, not grafting. `changed_from` keeps such a check strong: the result must also differ
#   from what a no-op adapter would give by far more than the tolerance.

#: (rtol, atol) per floating dtype: torch.testing.assert_close's defaults.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
    torch.complex64: (1.3e-6, 1e-5),
    torch.complex128: (1e-7, 1e-7),
}
#: How many tolerances apart ``expected`` and ``changed_from`` must be, at least, somewhere: a result
#: off by more than 1/MARGIN of the adapter's effect then fails. Coarse dtypes get fewer (see :func:`margin`).
MARGIN = 100.0

Nested = Any  # a tensor, or tuples/lists/dicts/ModelOutputs of them (other leaves compare with ==)


def tolerance(expected: torch.Tensor) -> tuple[float, float]:
    """The (rtol, atol) :func:`assert_close` uses for ``expected`` unless told otherwise.

    rtol is the dtype's ``torch.testing`` default; atol is the dtype's default times the largest
    magnitude in ``expected`` (unscaled when that is 0). A product's rounding error follows the size
    of its terms, not of each result: an entry that cancels to near zero next to large ones gets the
    same absolute slack as they do, and outputs of scale 1e-3 (gradients) get a thousandth of it.
    Integer and bool tensors get (0, 0): they compare exactly.
    """
    if not (expected.is_floating_point() or expected.is_complex()):
        return 0.0, 0.0
    rtol, atol = TOLERANCES.get(expected.dtype, TOLERANCES[torch.float32])
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    if math.isfinite(scale) and scale > 0.0:
        atol *= scale
    return rtol, atol


def margin(rtol: float) -> float:
    """How many tolerances ``changed_from`` must be away: :data:`MARGIN`, but at most ``0.5 / rtol``.

    A move of ``1 / rtol`` tolerances is as large as the output itself; bfloat16 (rtol 1.6e-2) thus
    asks for 31 tolerances (an error of 3% of the adapter's effect fails), float32 and float64 for 100.
    """
    return min(MARGIN, 0.5 / rtol) if rtol > 0 else MARGIN


def _leaves(value: Nested, path: str = "") -> list[tuple[str, Any]]:
    """(path, leaf) pairs of a nested structure, in order; dict keys are part of the path."""
    if isinstance(value, torch.Tensor):
        return [(path, value)]
    if isinstance(value, Mapping):
        out: list[tuple[str, Any]] = [(f"{path}{{keys}}", sorted(map(str, value)))]
        for key in sorted(value, key=str):
            out += _leaves(value[key], f"{path}[{key!r}]")
        return out
    if isinstance(value, (tuple, list)):
        out = [(f"{path}{{len}}", len(value))]
        for i, item in enumerate(value):
            out += _leaves(item, f"{path}[{i}]")
        return out
    return [(path, value)]


def _pairs(actual: Nested, expected: Nested, msg: str) -> list[tuple[str, Any, Any]]:
    mine, theirs = _leaves(actual), _leaves(expected)
    prefix = f"{msg}: " if msg else ""
    if [p for p, _ in mine] != [p for p, _ in theirs]:
        raise AssertionError(f"{prefix}structures differ: {[p for p, _ in mine]} != {[p for p, _ in theirs]}")
    pairs = []
    for (path, a), (_, e) in zip(mine, theirs):
        where = f"{prefix}{path or 'value'}"
        if isinstance(a, torch.Tensor) != isinstance(e, torch.Tensor):
            raise AssertionError(f"{where}: {type(a).__name__} != {type(e).__name__}")
        if not isinstance(a, torch.Tensor) and a != e:
            raise AssertionError(f"{where}: {a!r} != {e!r}")
        if isinstance(a, torch.Tensor):
            if a.dtype != e.dtype or a.shape != e.shape:
                raise AssertionError(f"{where}: {a.dtype}{list(a.shape)} != {e.dtype}{list(e.shape)}")
            pairs.append((where, a.detach(), e.detach()))
    return pairs


def assert_identical(actual: Nested, expected: Nested, msg: str = "") -> None:
    """Bit-for-bit equality, with the same dtypes, shapes and (for mappings) keys.

    For pure data movement only: saved or reloaded tensors against their source, keys, shapes,
    weights restored by an exact operation, parameters nothing should have touched. Anything a
    matrix product computed is compared with :func:`assert_close`.
    """
    for where, a, e in _pairs(actual, expected, msg):
        if a.device != e.device:
            raise AssertionError(f"{where}: device {a.device} != {e.device}")
        bits_a, bits_e = (t.contiguous().reshape(-1).view(torch.uint8) for t in (a, e))
        if not torch.equal(bits_a, bits_e):
            differ = a != e if not (a.is_floating_point() or a.is_complex()) else ~((a == e) | (a.isnan() & e.isnan()))
            count = int(differ.sum())
            detail = f"{count} of {a.numel()} elements differ"
            if count and (a.is_floating_point() or a.is_complex()):
                detail += f" (max abs diff {(a - e)[differ].abs().max().item():.3g})"
            elif not count:
                detail = "equal values with different bits (signed zeros or nan payloads)"
            raise AssertionError(f"{where}: not bit-identical: {detail}")


def assert_close(
    actual: Nested,
    expected: Nested,
    *,
    changed_from: Nested = None,
    rtol: float | None = None,
    atol: float | None = None,
    msg: str = "",
) -> None:
    """``actual`` equals ``expected`` up to rounding: for results of matrix products.

    The tolerance is :func:`tolerance` (the dtype's ``torch.testing`` default, atol scaled to
    ``expected``'s magnitude) unless ``rtol``/``atol`` are given -- tighter where the math allows,
    e.g. float64 against a float64 formula. Dtypes and shapes must match; integer leaves compare exactly.

    With ``changed_from`` (say, the base model's output), ``expected`` must also differ from it by
    at least :func:`margin` (100) times the tolerance somewhere, so the check would fail if the adapter
    had no effect or an effect too small to tell a right result from a wrong one.
    """
    for where, a, e in _pairs(actual, expected, msg):
        r, t = _tolerance_of(e, rtol, atol)
        torch.testing.assert_close(a, e, rtol=r, atol=t, equal_nan=True, msg=_prefixed(where))
    if changed_from is None:
        return
    moved, needed = 0.0, MARGIN
    for _, b, e in _pairs(changed_from, expected, f"{msg}: changed_from" if msg else "changed_from"):
        if e.numel() and (e.is_floating_point() or e.is_complex()):
            r, t = _tolerance_of(e, rtol, atol)
            moved = max(moved, ((e - b).abs() / (t + r * e.abs())).nan_to_num(0.0).max().item())
            needed = min(needed, margin(r))
    if moved < needed:
        prefix = f"{msg}: " if msg else ""
        raise AssertionError(
            f"{prefix}the expected result is only {moved:.3g} tolerances away from `changed_from` (at least "
            f"{needed:.3g} required): a no-op or wrong adapter would pass this comparison"
        )


def _tolerance_of(expected: torch.Tensor, rtol: float | None, atol: float | None) -> tuple[float, float]:
    default_rtol, default_atol = tolerance(expected)
    return (default_rtol if rtol is None else rtol), (default_atol if atol is None else atol)


def _prefixed(where: str) -> Callable[[str], str]:
    return lambda message: f"{where}: {message}"


# -- helpers for a plugin's tests ---------------------------------------------------------------------------
def adapter_parameters(
    model: nn.Module, adapter_name: str | None = None, *, modules_to_save: bool = False
) -> dict[str, torch.Tensor]:
    """The parameters of layer adapters, shared states and model adapters (of one adapter if given), by name.

    With ``modules_to_save``, the adapter's trained copies of whole modules (``modules_to_save``) too.
    """
    parts = (".adapters.", "shared_states.", "model_adapters.") + ((".modules_to_save.",) if modules_to_save else ())
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        for part in parts:
            if part in name:
                owner = name.split(part, 1)[1].split(".", 1)[0]
                if adapter_name is None or owner == adapter_name:
                    out[name] = p
    return out


@torch.no_grad()
def randomize_adapters(
    model: nn.Module,
    seed: int = 0,
    adapter_name: str | None = None,
    scale: float = 0.3,
    *,
    modules_to_save: bool = False,
) -> None:
    """Add seeded noise to every adapter parameter, so that a fresh (identity) adapter does something.

    With ``modules_to_save``, to the adapter's trained copies of whole modules too (:func:`adapter_parameters`).
    """
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(adapter_parameters(model, adapter_name, modules_to_save=modules_to_save).items()):
        p.add_((torch.randn(p.shape, generator=gen) * scale).to(p.dtype))


@torch.no_grad()
def randomize_named(model: nn.Module, keyword: str, seed: int = 0, scale: float = 0.3) -> None:
    """Like :func:`randomize_adapters`, for every parameter whose name contains ``keyword`` (e.g. a PEFT model's)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if keyword in name:
            p.add_((torch.randn(p.shape, generator=gen) * scale).to(p.dtype))


def parameters_named(model: nn.Module, *markers: str, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The parameters whose name contains one of ``markers`` (say ``"lokr_"``), of a grafting or PEFT model, by name.

    With ``adapter_name``, only that grafting adapter's (``….adapters.<adapter_name>.…``).
    """
    return {
        name: p
        for name, p in model.named_parameters()
        if any(marker in name for marker in markers) and (adapter_name is None or f".adapters.{adapter_name}." in name)
    }


def peft_parameter_name(name: str) -> str:
    """grafting's ``<layer>.adapters.<adapter>.<attribute>[.<rest>]`` as PEFT names that tensor.

    PEFT keeps one dict per attribute, keyed by adapter: ``<layer>.<attribute>.<adapter>[.<rest>]``
    (``q.adapters.default.lokr_w1`` is ``q.lokr_w1.default``; ``….oft_R.weight`` is ``….oft_R.default.weight``).
    """
    path, _, rest = name.partition(".adapters.")
    adapter, _, local = rest.partition(".")
    attribute, dot, tail = local.partition(".")
    return f"{path}.{attribute}.{adapter}{dot}{tail}"


def base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the base model's floating-point weights, keyed by their path in the plain model."""
    out: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            for name, tensor in module.base_layer.named_parameters():
                out[f"{path}.{name}"] = tensor.detach().clone()
    return out


def check_layer_adapter_invariants(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    rebuild: Callable[[], nn.Module],
    folder: str,
    adapter_name: str = "default",
) -> None:
    """The properties every layer method must have, checked on ``model`` (a PeftModel with ``adapter_name`` active).

    The adapter must change the output by :data:`MARGIN` tolerances at least
    (randomize it first, :func:`randomize_adapters`); then: disabled = base; per-sample routing
    = each sample alone (for an adapter with a weight-site layer adapter, which cannot route:
    refused with :class:`grafting.AdapterStateError`, the model unchanged); merged = unmerged and unmerge restores the weights;
    saved then loaded (strictly, onto ``rebuild()``, a fresh copy of the base
    model) = the same output; merge_and_unload = the same output, without any
    grafting wrapper. Float64 models give the tightest check. ``inputs`` needs
    a batch of 2 or more. Raises AssertionError naming the failed property.
    """

    out = model_output(model, inputs)
    # a merged layer rounds W + ΔW before the product: 1000 epsilons of the output's scale (float64 is tight)
    merge_rtol = 1000 * torch.finfo(out.dtype).eps
    merge_atol = merge_rtol * max(1.0, float(out.abs().max()))

    def merged_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
        assert_close(actual, expected, rtol=merge_rtol, atol=merge_atol, msg=what)

    with model.disable_adapter():  # type: ignore[operator]
        base = model_output(model, inputs)
    assert_close(out, out, changed_from=base, rtol=merge_rtol, atol=merge_atol, msg="the adapter's effect")
    batch = next(iter(inputs.values())).shape[0]
    assert batch >= 2, "inputs need a batch of 2 or more for the routing check"
    routes = [adapter_name if i % 2 == 0 else BASE for i in range(batch)]
    layers = [m for m in model.modules() if isinstance(m, AdaptedLayer) and adapter_name in m.adapters]
    if any(layer.adapters[adapter_name].site is Site.WEIGHT for layer in layers):
        try:
            model_output(model, {**inputs, "adapter_names": routes})
        except AdapterStateError:
            assert_close(model_output(model, inputs), out, msg="output after the refused routing")
        else:
            raise AssertionError("per-sample routing of a weight adapter ran instead of being refused")
    else:
        routed = model_output(model, {**inputs, "adapter_names": routes})
        for i, route in enumerate(routes):
            assert_close(routed[i], (out if route == adapter_name else base)[i], msg=f"sample {i} routed to {route}")
    weights = base_tensors(model)
    model.merge_adapter([adapter_name])  # type: ignore[operator]
    merged_close(model_output(model, inputs), out, "merged output")
    model.unmerge_adapter()  # type: ignore[operator]
    for key, value in base_tensors(model).items():
        merged_close(value, weights[key], f"{key} after unmerge")
    merged_close(model_output(model, inputs), out, "output after unmerge")
    model.save_pretrained(folder, selected_adapters=[adapter_name])  # type: ignore[operator]
    saved = folder if adapter_name == "default" else f"{folder}/{adapter_name}"
    loaded = PeftModel.from_pretrained(rebuild(), saved, adapter_name=adapter_name)
    assert_close(model_output(loaded, inputs), out, msg="output after save and load")
    plain = copy.deepcopy(model).merge_and_unload(adapter_names=[adapter_name])  # type: ignore[operator]
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules()), "merge_and_unload left an adapted layer"
    merged_close(model_output(plain, inputs), out, "merge_and_unload output")


def check_module_dropout(adapter: nn.Module, run: Callable[[], torch.Tensor], p: float = 0.5, draws: int = 12) -> None:
    """``adapter``'s ``module_dropout`` (``p``) skips the whole adapter on the draws PEFT's LyCORIS methods make.

    ``adapter`` is in train mode and ``run()`` returns its contribution to one forward (its delta, say).
    Each forward draws one ``torch.rand(1)`` and the adapter is skipped (``run()`` is all zeros) when the
    draw is at most ``p``; some draws must skip it and some not. In eval mode it is never skipped.
    """
    torch.manual_seed(5)
    expected = [float(torch.rand(1)) <= p for _ in range(draws)]
    torch.manual_seed(5)
    skipped = [bool(torch.count_nonzero(run()) == 0) for _ in range(draws)]
    assert skipped == expected, f"skipped on {skipped}, the draws say {expected}"
    assert any(skipped), "the draws should skip the adapter sometimes"
    assert not all(skipped), "the draws should not skip the adapter always"
    adapter.eval()
    assert all(torch.count_nonzero(run()) > 0 for _ in range(5)), "module dropout acted in eval mode"


# -- checks against PEFT (need ``peft``) ---------------------------------------------------------------------
def check_peft_loads_the_save(
    model: PeftModel,
    rebuild: Callable[[], nn.Module],
    run: Callable[[nn.Module], torch.Tensor],
    folder: str | os.PathLike[str],
    other: str = "other",
    **tolerance: float,
) -> None:
    """Saved by grafting, loaded by PEFT: the same outputs, adapter by adapter.

    ``model`` (a PeftModel) holds ``"default"``, active, and a second adapter ``other``; ``rebuild()``
    makes a fresh base model and ``run(model)`` its output (say, :func:`model_output` on fixed inputs).
    Both adapters are saved into ``folder``, PEFT loads them onto ``rebuild()`` and must compute what
    ``model`` computed with each (:func:`assert_close`, with ``tolerance``'s ``rtol``/``atol`` if given).
    Leaves ``other`` active on ``model``.
    """
    import peft

    expected = run(model)
    model.set_adapter(other)
    expected_other = run(model)
    model.save_pretrained(folder)
    theirs = peft.PeftModel.from_pretrained(rebuild(), folder)
    assert_close(run(theirs), expected, changed_from=run(rebuild()), msg="default, loaded by PEFT", **tolerance)
    theirs.load_adapter(os.path.join(folder, other), adapter_name=other)
    theirs.set_adapter(other)
    assert_close(run(theirs), expected_other, changed_from=expected, msg=f"{other}, loaded by PEFT", **tolerance)


def assert_same_gradients(
    ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor], rtol: float = 1e-9, atol: float = 1e-9
) -> None:
    """Every parameter in ``ours`` (grafting's, by name) has the gradient of PEFT's parameter of the same tensor.

    ``theirs`` maps PEFT's names (:func:`peft_parameter_name`) to its parameters, after one backward pass
    of the same loss on both models; the tolerance suits float64 models.
    """
    reference = {name: p.grad for name, p in theirs.items()}
    for name, p in ours.items():
        assert p.grad is not None, f"{name} got no gradient"
        assert_close(p.grad, reference[peft_parameter_name(name)], rtol=rtol, atol=atol, msg=name)
