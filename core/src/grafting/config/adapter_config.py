"""The config base class every method extends, and its adapter_config.json round trip."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
import warnings
from typing import Any, ClassVar, TypeVar

import attrs

# field validators, kept importable from here for code written before grafting.toolkit
from grafting.config.validators import (
    boolean,
    names,
    one_of,
    optional_string,
    positive,
    positive_int,
    probability,
    regexes,
)
from grafting.errors import AdapterLoadError, ConfigError, GraftingError, GraftingWarning
from grafting.io.files import atomic_write_text
from grafting.io.hub import resolve_adapter_folder
from grafting.registry.dispatch import config_from_dict
from grafting.registry.plugins import get_method

__all__ = ["AdapterConfig", "TaskType", "one_of", "positive", "positive_int", "probability", "read_config_file"]

CONFIG_NAME = "adapter_config.json"
C = TypeVar("C", bound="AdapterConfig")


class PeftType(str, enum.Enum):
    """A method's name as adapter_config.json writes it (PEFT 0.21's members; grafting implements some).

    ``config.peft_type`` is a member when the method's name is one; a
    third-party method outside PEFT's list keeps its plain string.
    """

    PROMPT_TUNING = "PROMPT_TUNING"
    MULTITASK_PROMPT_TUNING = "MULTITASK_PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    LORA = "LORA"
    ADALORA = "ADALORA"
    ADAMSS = "ADAMSS"
    BOFT = "BOFT"
    ADAPTION_PROMPT = "ADAPTION_PROMPT"
    IA3 = "IA3"
    BEFT = "BEFT"
    LILY = "LILY"
    LOHA = "LOHA"
    LOKR = "LOKR"
    OFT = "OFT"
    POLY = "POLY"
    LN_TUNING = "LN_TUNING"
    VERA = "VERA"
    FROD = "FROD"
    PVERA = "PVERA"
    FOURIERFT = "FOURIERFT"
    GLORA = "GLORA"
    XLORA = "XLORA"
    HRA = "HRA"
    VBLORA = "VBLORA"
    UNILORA = "UNILORA"
    CPT = "CPT"
    MISS = "MISS"
    RANDLORA = "RANDLORA"
    ROAD = "ROAD"
    TRAINABLE_TOKENS = "TRAINABLE_TOKENS"
    HIRA = "HIRA"
    SHIRA = "SHIRA"
    C3A = "C3A"
    WAVEFT = "WAVEFT"
    OSF = "OSF"
    DELORA = "DELORA"
    GRALORA = "GRALORA"
    CARTRIDGE = "CARTRIDGE"
    TINYLORA = "TINYLORA"
    PSOFT = "PSOFT"
    PEANUT = "PEANUT"
    SHADOW = "SHADOW"
    SUPERTUNING = "SUPERTUNING"
    DEFT = "DEFT"

    def __str__(self) -> str:
        return self.value


def as_peft_type(value: Any) -> Any:
    """``value`` as a :class:`PeftType` member when PEFT knows the name, else unchanged."""
    if isinstance(value, str) and not isinstance(value, PeftType) and value in PeftType._value2member_map_:
        return PeftType(value)
    return value


class TaskType(str, enum.Enum):
    """The task a model is adapted for; picks the PeftModel subclass."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


def _names(value: Any) -> Any:
    """Normalize a module-name option: None, a regex string, or a list of names (checked by ``_check_names``)."""
    if value is None or isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
        return value
    return list(value)


def _check_names(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            f"{type(instance).__name__}.{attribute.name} must be None, a regex string or a list of module names,"
            f" got {value!r}"
        )


def _layer_indices(value: Any) -> Any:
    """An int or a list of ints becomes a list of ints (anything else is left for ``_check_indices``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    return value


def _check_indices(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not (
        isinstance(value, list) and all(isinstance(v, int) and 0 <= v < 2**31 for v in value)
    ):
        raise ConfigError(
            f"{type(instance).__name__}.{attribute.name} must be a layer index or a list of them, got {value!r}"
        )


def _task_type(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return TaskType(str(value)).value
    except ValueError:
        known = ", ".join(t.value for t in TaskType)
        raise ConfigError(f"task_type {value!r} is not one of {known}") from None


class _DataclassFields:
    """``__dataclass_fields__`` of a config class, built from its attrs fields on first use.

    With it, the standard library's ``dataclasses.replace``, ``fields``,
    ``asdict`` and ``is_dataclass`` work on grafting's configs as on PEFT's
    dataclasses (``replace`` builds a new config through ``__init__``, so the
    fields are validated again).
    """

    def __get__(self, instance: Any, owner: type) -> dict[str, dataclasses.Field]:
        cached = owner.__dict__.get("_dataclass_fields_cache")
        if cached is None:
            names: list[Any] = [("peft_type", Any, dataclasses.field(init=False))]  # read-only, as asdict shows it
            names += [(f.name, Any) for f in attrs.fields(owner) if f.init]
            shadow = dataclasses.make_dataclass(owner.__name__, names, kw_only=True)
            cached = dict(shadow.__dataclass_fields__)  # type: ignore[attr-defined]
            type.__setattr__(owner, "_dataclass_fields_cache", cached)
        return cached


@attrs.define(kw_only=True)
class AdapterConfig:
    """Options every method shares. Subclasses set ``peft_type`` and add their own fields.

    ``extra`` holds keys read from a file that this class does not know; they
    are written back unchanged.
    """

    peft_type: ClassVar[str] = ""
    __dataclass_fields__: ClassVar[Any] = _DataclassFields()
    #: Keys PEFT writes for features grafting does not implement, with PEFT's
    #: default. Read and written back; any other value is a ConfigError.
    inert_keys: ClassVar[dict[str, Any]] = {}
    #: Shared options that PEFT's config class for this method lacks: written only when set.
    absent_in_peft: ClassVar[tuple[str, ...]] = ()
    #: PEFT's ``is_adaption_prompt``: ``True`` on the adaption prompt method's config, which declares it.
    is_adaption_prompt: ClassVar[bool] = False
    #: Fields that map module-name patterns to per-module values (``rank_pattern``): a key that
    #: matches none of the adapted modules is reported with an ``UnusedOptionWarning``.
    pattern_fields: ClassVar[tuple[str, ...]] = ()
    #: Keys kept and written back whatever they hold (informational).
    informational_keys: ClassVar[tuple[str, ...]] = ("auto_mapping", "peft_version")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared = cls.__dict__.get("peft_type")
        if declared is not None:  # a plugin's plain string becomes PEFT's enum member when PEFT has one
            cls.peft_type = as_peft_type(declared)

    task_type: str | None = attrs.field(default=None, converter=_task_type)
    base_model_name_or_path: str | None = attrs.field(default=None, validator=optional_string)
    revision: str | None = attrs.field(default=None, validator=optional_string)
    inference_mode: bool = attrs.field(default=False, validator=boolean)
    target_modules: list[str] | str | None = attrs.field(default=None, converter=_names, validator=names)
    exclude_modules: list[str] | str | None = attrs.field(default=None, converter=_names, validator=names)
    layers_to_transform: list[int] | None = attrs.field(
        default=None, converter=_layer_indices, validator=_check_indices
    )
    layers_pattern: list[str] | str | None = attrs.field(
        default=None, converter=_names, validator=[_check_names, regexes]
    )
    modules_to_save: list[str] | None = attrs.field(default=None, converter=_names, validator=_check_names)
    extra: dict[str, Any] = attrs.field(factory=dict, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ConfigError(f"{type(self).__name__}: layers_pattern needs layers_to_transform")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            # a regex selects layers itself; PEFT refuses this combination when loading
            raise ConfigError(
                f"{type(self).__name__}: layers_to_transform needs target_modules as a list of names, not the"
                f" string {self.target_modules!r} (write the layer indices into the regex instead)"
            )
        if isinstance(self.modules_to_save, str):
            raise ConfigError(f"{type(self).__name__}.modules_to_save must be a list of names")

    # -- JSON round trip ----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The adapter_config.json content, as PEFT writes it."""
        out: dict[str, Any] = dict(self.inert_keys)
        out.update(self.extra)
        for field in attrs.fields(type(self)):
            if field.name == "extra":
                continue
            value = getattr(self, field.name)
            out[field.name] = _jsonable(value)
        out["peft_type"] = str(_jsonable(self.peft_type))
        for key in self.absent_in_peft:
            if out.get(key) is None:
                out.pop(key, None)
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], *, source: str = "config") -> C:
        """Build a config from adapter_config.json content (PEFT's, any version)."""
        data = dict(data)
        peft_type = data.pop("peft_type", cls.peft_type)
        if not isinstance(peft_type, str) or (cls.peft_type and peft_type.upper() != cls.peft_type):
            raise ConfigError(f"{source}: field peft_type {peft_type!r} is not {cls.peft_type!r} ({cls.__name__})")
        known = {f.name for f in attrs.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        extra_value = data.pop("extra", None) or {}
        if not isinstance(extra_value, dict):
            raise ConfigError(f"{source}: field extra must be a dict, got {extra_value!r}")
        extra: dict[str, Any] = dict(extra_value)
        unknown: list[str] = []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in cls.inert_keys:
                if not _same(value, cls.inert_keys[key]):
                    raise ConfigError(
                        f"{source}: {cls.__name__} option {key}={value!r} is a PEFT feature grafting"
                        f" does not implement (only {cls.inert_keys[key]!r} is accepted)"
                    )
            else:
                extra[key] = value
                if key not in cls.informational_keys:
                    unknown.append(key)
        if unknown:
            warnings.warn(
                f"{source}: {cls.__name__} does not know the keys {sorted(unknown)}; they are kept and"
                " written back, but have no effect",
                GraftingWarning,
                stacklevel=2,
            )
        try:
            return cls(**kwargs, extra=extra)
        except (TypeError, ValueError, OverflowError, RecursionError, re.error) as exc:  # a validator, a keyword
            raise ConfigError(f"{source}: {exc}") from None

    def to_json_string(self) -> str:
        # to_dict() sorts the top-level keys; nested dicts keep their order, which carries meaning
        # (the first rank_pattern key that matches a module wins)
        return config_json(self.to_dict())

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        """Write adapter_config.json atomically into ``save_directory`` (``kwargs`` are accepted for PEFT's sake)."""
        os.makedirs(save_directory, exist_ok=True)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), self.to_json_string())

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike[str], subfolder: str | None = None, **kwargs: Any
    ) -> AdapterConfig:
        """Read adapter_config.json from a folder or a Hub repository.

        On a method's class, that class reads it; on ``AdapterConfig`` itself
        (PEFT's ``PeftConfig.from_pretrained``) the installed method of its
        ``peft_type`` does (:func:`grafting.registry.dispatch.config_from_dict`).
        ``revision`` picks the Hub revision; other keyword arguments override config fields.
        """
        revision = kwargs.pop("revision", None)
        folder = resolve_adapter_folder(pretrained_model_name_or_path, subfolder, revision)
        data = read_config_file(folder)
        data.update(kwargs)
        if cls is AdapterConfig:
            return config_from_dict(data, source=os.path.join(folder, CONFIG_NAME))
        return cls.from_dict(data, source=os.path.join(folder, CONFIG_NAME))

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike[str], **kwargs: Any) -> dict[str, Any]:
        """The content of a JSON config file as a dict (PEFT's helper; build a config with ``from_dict``)."""
        with open(path_json_file, encoding="utf-8") as fh:
            data = json.load(fh)
        if not isinstance(data, dict):
            raise ConfigError(f"{path_json_file} does not hold a JSON object")
        data.pop("runtime_config", None)  # PEFT never reads it back either
        return data

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> AdapterConfig:
        """The config of the method named by ``kwargs["peft_type"]``, built from the other keyword arguments."""
        return config_from_dict(kwargs)

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """The keyword arguments a config is built from, unchanged (PEFT's hook for subclasses)."""
        return kwargs

    @property
    def is_prompt_learning(self) -> bool:
        """True for methods that act on the model's inputs (prompt tuning, P-tuning, prefix tuning)."""
        try:
            return get_method(str(self.peft_type)).level == "model"
        except GraftingError:
            return False

    # -- per-method extension points ----------------------------------------------
    def trainable_base_parameters(self, model: Any, adapted_paths: list[str]) -> list[str]:
        """Names of base-model parameters this config also trains and saves (e.g. biases)."""
        return []

    def trains_token_rows(self) -> bool:
        """Whether the adapter trains single embedding rows (PEFT's trainable tokens) and saves them itself.

        Then ``save_embedding_layers="auto"`` does not save the whole embedding for it (PEFT's rule).
        """
        return False

    def ties_weights(self) -> bool | None:
        """Whether adapters on a tied embedding are tied too (PEFT's ``ensure_weight_tying``).

        ``None`` (default): the method has no such option, and an adapter on a tied embedding
        only gets a warning. A method answering ``True`` adapts the tied partners of a targeted
        embedding itself (see :mod:`grafting.model.tying`); ``modules_to_save`` copies are tied by the core.
        """
        return None

    def for_model(self: C, model: Any) -> C:
        """This config with the values that depend on the model filled in (a copy; default: itself).

        Called by ``add_adapter`` before ``validate_for_model``; the result is
        the config the model keeps and saves.
        """
        return self

    def validate_for_model(self, model: Any) -> None:
        """Check options that need the model (subclasses may override)."""

    def as_update_of_base(self: C, tensors: dict[str, Any], initial: dict[str, Any]) -> tuple[C, dict[str, Any]]:
        """The config and tensors of an adapter that applies to the *original* base model.

        ``tensors`` are this adapter's saved tensors after training, ``initial`` the
        ones it was created with. For methods whose initialization rewrote the base
        weight (LoRA's PiSSA, OLoRA): ``save_pretrained(...,
        path_initial_model_for_weight_conversion=...)`` writes the result. Default:
        the method has no such conversion.
        """
        raise ConfigError(f"{type(self).__name__} adapters cannot be converted against an initial adapter")

    def select_targets(self, model: Any, names: list[str]) -> list[str]:
        """The modules to adapt among those the options matched (logical names, model order); default all."""
        return names


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    if attrs.has(type(value)):
        return attrs.asdict(value)
    return value


def _same(a: Any, b: Any) -> bool:
    if a == b:
        return True
    empty: tuple[Any, ...] = (None, {}, [], False)
    return a in empty and b in empty and type(a) is type(b)


#: adapter_config.json larger than this is refused before it is read (PEFT's are a few KiB).
MAX_CONFIG_BYTES = 16 * 2**20
#: JSON nested deeper than this is refused (PEFT's configs nest 3 levels).
MAX_CONFIG_DEPTH = 32


def read_config_file(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in ``folder``/adapter_config.json; AdapterLoadError naming the file if it is not one."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise AdapterLoadError(f"{folder} is not an adapter folder: {CONFIG_NAME} is missing")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise AdapterLoadError(f"cannot read {path}: {exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterLoadError(f"{path} is larger than {MAX_CONFIG_BYTES // 2**20} MiB: it is not an adapter config")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise AdapterLoadError(f"{path} is not UTF-8 text: {exc}") from None
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise AdapterLoadError(f"{path} is not valid JSON: {str(exc)[:200]}") from None
    if _depth(data) > MAX_CONFIG_DEPTH:
        raise AdapterLoadError(f"{path} nests deeper than {MAX_CONFIG_DEPTH} levels: it is not an adapter config")
    if not isinstance(data, dict) or "peft_type" not in data:
        raise AdapterLoadError(f"{path} has no peft_type: it is not an adapter config")
    return data


def _depth(value: Any) -> int:
    """How deeply lists and dicts nest in ``value`` (without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if level <= MAX_CONFIG_DEPTH:
                stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def load_config(folder: str | os.PathLike[str]) -> AdapterConfig:
    """The config saved in ``folder`` (adapter_config.json), as its method's class."""
    return config_from_dict(read_config_file(folder), source=os.path.join(folder, CONFIG_NAME))


def config_json(data: dict[str, Any]) -> str:
    """The text of adapter_config.json holding ``data`` (a config's :meth:`AdapterConfig.to_dict`)."""
    return json.dumps(data, indent=2) + "\n"
