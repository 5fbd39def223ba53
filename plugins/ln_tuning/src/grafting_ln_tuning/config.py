"""LNTuningConfig: the options of LN tuning, as PEFT writes them, and its default targets."""

from __future__ import annotations

from typing import ClassVar

import attrs

from grafting import AdapterConfig

_DECODER_NORMS = ("input_layernorm", "post_attention_layernorm", "norm")
_GEMMA2_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
    "norm",
)
#: The normalisation layers PEFT 0.21 tunes by default, by transformers model type (the same names).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("llama", "mistral", "gemma"), _DECODER_NORMS),
    **dict.fromkeys(("bloom", "falcon"), ("input_layernorm", "post_attention_layernorm", "ln_f")),
    "llava": ("multi_modal_projector", *_DECODER_NORMS, "embed_tokens", "lm_head"),
    **dict.fromkeys(("t5", "mt5"), ("layer_norm", "final_layer_norm")),
    "bart": ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"),
    "gpt2": ("ln_1", "ln_2", "ln_f"),
    "blip-2": ("layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"),
    "gptj": ("ln_1", "ln_f"),
    "phi": ("input_layernorm", "final_layernorm"),
    **dict.fromkeys(("gemma2", "gemma3_text"), _GEMMA2_NORMS),
    **dict.fromkeys(("qwen2", "qwen3"), ("post_attention_layernorm",)),
}


@attrs.define(kw_only=True)
class LNTuningConfig(AdapterConfig):
    """LN tuning: each targeted layer (a LayerNorm, an RMSNorm, any module) gets a trained copy.

    The copy's parameters replace the layer's own while the adapter is active;
    merging writes them into the layer, unmerging restores the original values.
    ``target_modules=None`` takes the model type's normalisation layers
    (:data:`DEFAULT_TARGETS`, PEFT's choice).
    """

    peft_type: ClassVar[str] = "LN_TUNING"
    #: Shared options PEFT's LNTuningConfig does not have: written only when set.
    absent_in_peft: ClassVar[tuple[str, ...]] = ("layers_to_transform", "layers_pattern")
