"""The modules IA3 adapts when ``target_modules`` is not given, by model type (PEFT's choice)."""

from __future__ import annotations

from typing import Any, NamedTuple

from grafting.toolkit import model_type


class Defaults(NamedTuple):
    """Default ``target_modules`` and, among them, the ``feedforward_modules``."""

    targets: tuple[str, ...]
    feedforward: tuple[str, ...]


def _scheme(attention: tuple[str, ...], feedforward: str) -> Defaults:
    """Attention projections scaled at their output, one feed-forward projection at its input."""
    return Defaults((*attention, feedforward), (feedforward,))


_FALCON = _scheme(("query_key_value",), "dense_4h_to_h")
_QV_DOWN = _scheme(("q_proj", "v_proj"), "down_proj")
_ENCODER = _scheme(("key", "value"), "output.dense")

#: ``model.config.model_type`` -> the defaults. Names must be PEFT's: a config saved with
#: ``target_modules=None`` is resolved again by whichever library loads it.
DEFAULTS: dict[str, Defaults] = {
    "t5": _scheme(("k", "v"), "wo"),
    "mt5": Defaults(("k", "v", "wi_1"), ()),
    "gpt2": _scheme(("c_attn",), "mlp.c_proj"),
    "gpt_bigcode": _scheme(("c_attn",), "mlp.c_proj"),
    "bloom": _scheme(("query_key_value",), "mlp.dense_4h_to_h"),
    "gpt_neox": _FALCON,
    "falcon": _FALCON,
    "RefinedWeb": _FALCON,
    "RefinedWebModel": _FALCON,
    "gptj": _scheme(("q_proj", "v_proj"), "fc_out"),
    "gpt_neo": _scheme(("q_proj", "v_proj"), "c_proj"),
    "opt": _scheme(("q_proj", "k_proj"), "fc2"),
    "bart": _scheme(("q_proj", "v_proj"), "fc2"),
    "phi": _scheme(("q_proj", "v_proj"), "fc2"),
    "llama": _scheme(("k_proj", "v_proj"), "down_proj"),
    "mistral": _scheme(("k_proj", "v_proj"), "down_proj"),
    "mixtral": _scheme(("k_proj", "v_proj"), "w2"),
    "llama4": _QV_DOWN,
    "gemma": _QV_DOWN,
    "gemma2": _QV_DOWN,
    "gemma3_text": _QV_DOWN,
    "qwen2": _QV_DOWN,
    "qwen3": _QV_DOWN,
    "bert": _ENCODER,
    "roberta": _ENCODER,
    "deberta-v2": _scheme(("key_proj", "value_proj"), "output.dense"),
    "deberta": _scheme(("in_proj",), "output.dense"),
}


def defaults_for(model: Any) -> Defaults | None:
    """The default IA3 modules of ``model``'s type, or ``None`` if the type is unknown."""
    return DEFAULTS.get(model_type(model))
