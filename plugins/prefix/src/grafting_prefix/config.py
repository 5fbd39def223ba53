"""Configs of prompt tuning, P-tuning and prefix tuning, with the keys PEFT writes."""

from __future__ import annotations

import enum
import warnings
from typing import Any, ClassVar

import attrs
from torch import nn

from grafting import AdapterConfig, ConfigError, GraftingWarning, UnsupportedLayerError
from grafting.toolkit import boolean, check_count, one_of, optional_string, positive_int, probability
from grafting_prefix import calls, geometry

optional_positive_int = attrs.validators.optional(positive_int)


def _plain(value: Any) -> Any:
    """An enum member (PEFT's ``PromptTuningInit.TEXT``) becomes its string value."""
    return value.value if isinstance(value, enum.Enum) else value


@attrs.define(kw_only=True)
class PromptLearningConfig(AdapterConfig):
    """Options the virtual-token methods share.

    ``num_virtual_tokens`` is required when the adapter is added (a config
    may be built without it, as in PEFT). ``token_dim``, ``num_layers``,
    ``num_attention_heads`` and ``num_transformer_submodules`` describe the
    model; left ``None``, they are read from the model's config when the
    adapter is added, and saved (as PEFT saves them).
    """

    #: Task types the method runs on (the task decides how labels and token types are extended).
    task_types: ClassVar[tuple[str, ...]] = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION")
    #: Whether the virtual tokens are embeddings fed with the input's (prompt tuning, P-tuning).
    feeds_embeddings: ClassVar[bool] = True
    #: Layer-targeting options of every config: they do not apply here and PEFT does not write them.
    absent_in_peft: ClassVar[tuple[str, ...]] = (
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
    )

    num_virtual_tokens: int | None = attrs.field(default=None)
    token_dim: int | None = attrs.field(default=None, validator=optional_positive_int)
    num_transformer_submodules: int | None = attrs.field(default=None, validator=optional_positive_int)
    num_attention_heads: int | None = attrs.field(default=None, validator=optional_positive_int)
    num_layers: int | None = attrs.field(default=None, validator=optional_positive_int)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        name = type(self).__name__
        if self.num_virtual_tokens is not None:
            check_count(self.num_virtual_tokens, f"{name}.num_virtual_tokens")
        for key in self.absent_in_peft:
            if getattr(self, key) is not None:
                raise ConfigError(
                    f"{name}.{key}={getattr(self, key)!r}: {self.peft_type} adds virtual tokens to the model's"
                    " input and adapts no module, so this option does not apply (leave it None)"
                )

    # -- the model -----------------------------------------------------------------------
    def for_model(self, model: nn.Module) -> PromptLearningConfig:
        """A copy with the unset model dimensions read from ``model``'s config."""
        if self.num_virtual_tokens is None:
            raise ConfigError(f"{type(self).__name__}.num_virtual_tokens is not set: give the number of virtual tokens")
        config = geometry.text_config(model)
        derived: dict[str, Any] = {}
        for field, names in (
            ("num_layers", geometry.LAYERS),
            ("token_dim", geometry.WIDTH),
            ("num_attention_heads", geometry.HEADS),
        ):
            if getattr(self, field) is None:
                value = geometry.read(config, names)
                if value is None:
                    raise ConfigError(
                        f"{type(self).__name__}.{field} is not set and {type(model).__name__}'s config has none of"
                        f" {list(names)}: set {field} in the config"
                    )
                derived[field] = value
        if self.num_transformer_submodules is None:
            derived["num_transformer_submodules"] = 2 if self.task_type == "SEQ_2_SEQ_LM" else 1
        return attrs.evolve(self, **derived)

    def validate_for_model(self, model: nn.Module) -> None:
        name = type(self).__name__
        if self.task_type not in self.task_types:
            raise ConfigError(
                f"{name}: task_type={self.task_type!r} is not supported by grafting's {self.peft_type};"
                f" use one of {list(self.task_types)}"
            )
        seq2seq = self.task_type == "SEQ_2_SEQ_LM"
        if geometry.is_encoder_decoder(model) != seq2seq:
            kind = "an encoder-decoder" if geometry.is_encoder_decoder(model) else "not an encoder-decoder"
            raise UnsupportedLayerError(
                f"{name}: {type(model).__name__} is {kind} model, which task_type={self.task_type!r} does not fit"
            )
        if self.num_transformer_submodules not in ((1, 2) if seq2seq else (1,)):
            raise ConfigError(
                f"{name}.num_transformer_submodules={self.num_transformer_submodules}: a model with one"
                " transformer stack takes 1 (an encoder-decoder model 1 or 2)"
            )
        if self.feeds_embeddings:
            get = getattr(model, "get_input_embeddings", None)
            embeddings = get() if callable(get) else None
            width = getattr(embeddings, "embedding_dim", None)
            if width is None:
                raise UnsupportedLayerError(
                    f"{name}: {type(model).__name__} has no input embedding layer (get_input_embeddings) to feed"
                    " virtual tokens with"
                )
            if width != self.token_dim:
                raise ConfigError(
                    f"{name}.token_dim={self.token_dim} differs from the width {width} of"
                    f" {type(model).__name__}'s input embeddings"
                )


class PromptTuningInit(str, enum.Enum):
    """How prompt tuning initializes its virtual tokens."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


@attrs.define(kw_only=True)
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: ``num_virtual_tokens`` learned embeddings prepended to the input.

    ``prompt_tuning_init``: ``"RANDOM"`` (normal), ``"SAMPLE_VOCAB"``
    (embeddings of random vocabulary tokens) or ``"TEXT"`` (the embeddings of
    ``prompt_tuning_init_text`` tokenized by the tokenizer at
    ``tokenizer_name_or_path``, repeated or cut to length).
    """

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    prompt_tuning_init: str = attrs.field(
        default="RANDOM", converter=_plain, validator=one_of(*(m.value for m in PromptTuningInit))
    )
    prompt_tuning_init_text: str | None = attrs.field(default=None, validator=optional_string)
    tokenizer_name_or_path: str | None = attrs.field(default=None, validator=optional_string)
    tokenizer_kwargs: dict[str, Any] | None = None

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        text = self.prompt_tuning_init == PromptTuningInit.TEXT
        if text and not self.tokenizer_name_or_path:
            raise ConfigError("PromptTuningConfig: prompt_tuning_init='TEXT' needs tokenizer_name_or_path")
        if text and not self.prompt_tuning_init_text:
            raise ConfigError("PromptTuningConfig: prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
        if self.tokenizer_kwargs and not text:
            raise ConfigError("PromptTuningConfig.tokenizer_kwargs applies only with prompt_tuning_init='TEXT'")
        if self.tokenizer_kwargs is not None and not isinstance(self.tokenizer_kwargs, dict):
            raise ConfigError(f"PromptTuningConfig.tokenizer_kwargs must be a dict, got {self.tokenizer_kwargs!r}")


@attrs.define(kw_only=True)
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: virtual-token embeddings passed through a trained encoder (MLP or bidirectional LSTM).

    Only the encoder's output is saved (PEFT's format keeps no encoder), so
    a loaded P-tuning adapter holds its prompts directly.
    ``encoder_hidden_size`` defaults to the model's width.
    """

    peft_type: ClassVar[str] = "P_TUNING"

    encoder_reparameterization_type: str = attrs.field(default="MLP", converter=_plain, validator=one_of("MLP", "LSTM"))
    encoder_hidden_size: int | None = attrs.field(default=None, validator=optional_positive_int)
    encoder_num_layers: int = attrs.field(default=2, validator=positive_int)
    encoder_dropout: float = attrs.field(default=0.0, validator=probability)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.encoder_reparameterization_type == "MLP" and self.encoder_num_layers != 2:
            warnings.warn(
                "for MLP, the argument `encoder_num_layers` is ignored. Exactly 2 MLP layers are used."
                f" (PromptEncoderConfig: encoder_num_layers={self.encoder_num_layers}; PEFT's MLP encoder, and"
                " grafting's, has 3 linear layers; the option sets the LSTM's depth)",
                GraftingWarning,
                stacklevel=3,
            )

    def for_model(self, model: nn.Module) -> PromptEncoderConfig:
        config: PromptEncoderConfig = super().for_model(model)  # type: ignore[assignment]
        if config.encoder_hidden_size is None:
            config = attrs.evolve(config, encoder_hidden_size=config.token_dim)
        return config


@attrs.define(kw_only=True)
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: learned keys and values for ``num_virtual_tokens`` positions in every layer.

    With ``prefix_projection`` they are computed from ``token_dim``-wide
    embeddings by a two-layer MLP of width ``encoder_hidden_size`` (only its
    output is saved). ``init_weights="zero"`` starts from zero keys and
    values. For grouped-query attention ``token_dim`` and
    ``num_attention_heads`` describe the key/value heads, as in PEFT.
    """

    peft_type: ClassVar[str] = "PREFIX_TUNING"
    #: Any model whose attention takes a key/value cache (through the model's forward or, for a task head that passes
    #: its keywords on, its backbone's); an encoder-decoder's goes to its decoder.
    task_types: ClassVar[tuple[str, ...]] = (
        "CAUSAL_LM",
        "SEQ_2_SEQ_LM",
        "SEQ_CLS",
        "TOKEN_CLS",
        "QUESTION_ANS",
        "FEATURE_EXTRACTION",
    )
    feeds_embeddings: ClassVar[bool] = False

    init_weights: str | None = attrs.field(default=None, validator=one_of(None, "zero"))
    encoder_hidden_size: int | None = attrs.field(default=None, validator=optional_positive_int)
    prefix_projection: bool = attrs.field(default=False, validator=boolean)

    def for_model(self, model: nn.Module) -> PrefixTuningConfig:
        config: PrefixTuningConfig = super().for_model(model)  # type: ignore[assignment]
        assert config.token_dim is not None
        assert config.num_attention_heads is not None
        kv = geometry.kv_geometry(geometry.text_config(model), config.token_dim, config.num_attention_heads)
        if kv is not None:
            kv_heads, head_dim = kv
            config = attrs.evolve(config, token_dim=kv_heads * head_dim, num_attention_heads=kv_heads)
        if config.encoder_hidden_size is None:
            config = attrs.evolve(config, encoder_hidden_size=config.token_dim)
        return config

    def validate_for_model(self, model: nn.Module) -> None:
        super().validate_for_model(model)
        assert self.token_dim is not None
        assert self.num_attention_heads is not None
        if self.token_dim % self.num_attention_heads:
            raise ConfigError(
                f"PrefixTuningConfig: token_dim={self.token_dim} is not a multiple of"
                f" num_attention_heads={self.num_attention_heads}"
            )
        if self.task_type == "SEQ_2_SEQ_LM":
            self._check_decoder(model)
        expected = self._model_heads(model)
        actual = (self.num_layers, self.num_attention_heads, self.token_dim // self.num_attention_heads)
        if expected is not None and actual != expected:
            raise ConfigError(
                f"PrefixTuningConfig: num_layers={self.num_layers}, num_attention_heads={self.num_attention_heads},"
                f" token_dim={self.token_dim} give (layers, key/value heads, head width) {actual}, but"
                f" {type(model).__name__} has {expected}"
            )
        if calls.cache_argument(model) is None:
            raise UnsupportedLayerError(
                f"PrefixTuningConfig: {type(model).__name__}.forward takes no key/value cache"
                f" ({' or '.join(calls.CACHE_NAMES)}) to put the prefix in, and does not pass its keywords on to"
                " a backbone (model.base_model) that takes one; its attention cannot see a prefix"
            )
        if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
            raise ConfigError(
                "PrefixTuningConfig: the model uses gradient checkpointing, which recomputes layers without the"
                " prefix cache; disable it for prefix tuning"
            )

    def _check_decoder(self, model: nn.Module) -> None:
        """An encoder-decoder model's prefix goes to its decoder, one block of keys and values per decoder layer."""
        if self.num_transformer_submodules != 2:
            raise ConfigError(
                f"PrefixTuningConfig.num_transformer_submodules={self.num_transformer_submodules}: on an"
                " encoder-decoder model prefix tuning needs 2 (PEFT's default); with 1, PEFT hands one cache to"
                " both the self- and the cross-attention, which grafting does not reproduce"
            )
        decoder_layers = geometry.read(geometry.text_config(model), geometry.DECODER_LAYERS)
        if decoder_layers is not None and decoder_layers != self.num_layers:
            raise ConfigError(
                f"PrefixTuningConfig.num_layers={self.num_layers}, but {type(model).__name__}'s decoder has"
                f" {decoder_layers} layers"
            )

    @staticmethod
    def _model_heads(model: nn.Module) -> tuple[int, int, int] | None:
        """(layers, key/value heads, head width) of ``model``, when its config tells them."""
        config = geometry.text_config(model)
        layers = geometry.read(config, geometry.LAYERS)
        width = geometry.read(config, geometry.WIDTH)
        heads = geometry.read(config, geometry.HEADS)
        if layers is None or width is None or heads is None:
            return None
        kv = geometry.kv_geometry(config, width, heads)
        kv_heads, head_dim = kv if kv is not None else (heads, width // heads)
        return layers, kv_heads, head_dim
