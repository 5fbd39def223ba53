"""The record a plugin gives for each method it provides."""

from __future__ import annotations

from typing import Literal

import attrs

Level = Literal["layer", "model"]


@attrs.frozen
class Method:
    """A method as its plugin declares it.

    ``peft_type`` is the upper-case name written in adapter_config.json
    (``"LORA"``); ``name`` the short lower-case name (``"lora"``); ``level``
    says whether the method wraps layers or acts on the whole model.
    The plugin manager fills ``distribution`` and ``entry_point``.
    """

    peft_type: str = attrs.field(validator=attrs.validators.matches_re(r"[A-Z][A-Z0-9_]*"))
    name: str = attrs.field(validator=attrs.validators.matches_re(r"[a-z][a-z0-9_]*"))
    config_class: type = attrs.field()
    level: Level = attrs.field(default="layer", validator=attrs.validators.in_(("layer", "model")))
    description: str = ""
    distribution: str | None = None
    version: str | None = None
    entry_point: str | None = None


#: Where each known method ships, for install hints when it is missing.
KNOWN_DISTRIBUTIONS: dict[str, str] = {
    "LORA": "grafting-lora",
    "LOHA": "grafting-loha",
    "IA3": "grafting-ia3",
    "PREFIX_TUNING": "grafting-prefix",
    "PROMPT_TUNING": "grafting-prefix",
    "P_TUNING": "grafting-prefix",
    "ADAPTION_PROMPT": "grafting-adaption-prompt",
}

#: Config class names the core can resolve lazily, with their peft_type.
KNOWN_CONFIG_NAMES: dict[str, str] = {
    "LoraConfig": "LORA",
    "LoHaConfig": "LOHA",
    "IA3Config": "IA3",
    "PrefixTuningConfig": "PREFIX_TUNING",
    "PromptTuningConfig": "PROMPT_TUNING",
    "PromptEncoderConfig": "P_TUNING",
    "AdaptionPromptConfig": "ADAPTION_PROMPT",
}
