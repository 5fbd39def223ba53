"""AdaptionPromptConfig: how many prompt tokens, on how many of the top layers."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from grafting import AdapterConfig, ConfigError
from grafting.toolkit import positive_int
from grafting_adaption_prompt.attention import KINDS, kind_for, model_type


def _one_name(value: Any) -> Any:
    """A module name (PEFT saves one string) becomes a one-name list, the core's suffix match."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, tuple):
        return list(value)
    return value


def _check_one_name(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if not (isinstance(value, list) and len(value) == 1 and isinstance(value[0], str) and value[0]):
        raise ConfigError(
            f"AdaptionPromptConfig.target_modules must be None or the name of the attention modules"
            f" (one string such as 'self_attn'), got {value!r}"
        )


@attrs.define(kw_only=True)
class AdaptionPromptConfig(AdapterConfig):
    """Adaption prompt (LLaMA-Adapter): ``adapter_len`` learned prompt tokens per adapted attention module.

    The adapted modules are the last ``adapter_layers`` modules named
    ``target_modules`` (the top decoder layers). ``target_modules=None``
    is the attention module of the model type (``"self_attn"`` for Llama
    and Mistral, ``"attn"`` for GPT-2); the model's copy of the config
    names it, so the saved config does, as PEFT's.
    """

    peft_type: ClassVar[str] = "ADAPTION_PROMPT"
    is_adaption_prompt: ClassVar[bool] = True
    #: Shared options PEFT's AdaptionPromptConfig does not have: written only when set.
    absent_in_peft: ClassVar[tuple[str, ...]] = (
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "modules_to_save",
    )

    target_modules: list[str] | None = attrs.field(default=None, converter=_one_name, validator=_check_one_name)
    #: Both are required when the adapter is added; a config may be built without them, as in PEFT.
    adapter_len: int | None = attrs.field(default=None, validator=attrs.validators.optional(positive_int))
    adapter_layers: int | None = attrs.field(default=None, validator=attrs.validators.optional(positive_int))

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for name in ("exclude_modules", "layers_to_transform"):
            if getattr(self, name) is not None:
                raise ConfigError(
                    f"AdaptionPromptConfig.{name} is not supported: the adapted layers are the top adapter_layers"
                )

    @property
    def attention_name(self) -> str | None:
        return self.target_modules[0] if self.target_modules else None

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["target_modules"] = self.attention_name  # PEFT saves and reads one string
        return out

    def for_model(self, model: Any) -> AdaptionPromptConfig:
        """A copy naming the model type's attention modules when ``target_modules`` is ``None``, as PEFT saves it."""
        unset = [name for name in ("adapter_len", "adapter_layers") if getattr(self, name) is None]
        if unset:
            raise ConfigError(f"AdaptionPromptConfig: {' and '.join(unset)} not set; give both to add the adapter")
        found = KINDS.get(model_type(model) or "")
        if self.target_modules is None and found is not None:
            return attrs.evolve(self, target_modules=[found.attention])
        return self

    def validate_for_model(self, model: Any) -> None:
        """Refuse a model type whose attention the adapter cannot read."""
        kind_for(model)

    def select_targets(self, model: Any, names: list[str]) -> list[str]:
        """The top ``adapter_layers`` of the matched attention modules."""
        if not names:
            return names  # the core reports that nothing matched
        assert self.adapter_layers is not None  # for_model checked it
        if len(names) < self.adapter_layers:
            raise ConfigError(
                f"AdaptionPromptConfig.adapter_layers={self.adapter_layers}, but the model has only {len(names)}"
                f" {self.attention_name!r} modules ({names[0]} ... {names[-1]})"
            )
        return names[-self.adapter_layers :]
