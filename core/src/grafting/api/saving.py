"""Saving a PeftModel's adapters in PEFT's format: one transaction, each config serialized once."""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Any

from grafting.config.adapter_config import CONFIG_NAME, AdapterConfig, config_json
from grafting.errors import AdapterLoadError
from grafting.io.files import BIN_NAME, CONFIG_DIGEST_KEY, SAFETENSORS_NAME, config_digest, load_weights, write_weights
from grafting.io.hub import write_model_card
from grafting.io.state_dict import get_peft_model_state_dict
from grafting.io.transaction import inside, save_transaction

if TYPE_CHECKING:
    from grafting.api.peft_model import PeftModel

#: The adapter saved at the folder's root; every other adapter goes into a subfolder of its name.
DEFAULT = "default"


def base_model_name(peft_model: PeftModel) -> str | None:
    """The wrapped model's ``config.name_or_path``, or ``None``."""
    return getattr(getattr(peft_model.base_model.model, "config", None), "name_or_path", None) or None


def save_adapters(
    peft_model: PeftModel,
    save_directory: str | os.PathLike[str],
    *,
    safe_serialization: bool,
    selected_adapters: list[str] | None,
    save_embedding_layers: bool | str,
    is_main_process: bool,
    state_dict: dict[str, Any] | None,
    path_initial_model_for_weight_conversion: str | os.PathLike[str] | None,
) -> None:
    """What :meth:`PeftModel.save_pretrained` does (its docstring tells the options)."""
    if os.path.isfile(save_directory):
        raise AdapterLoadError(f"cannot save adapters to {save_directory}: it is a file, not a folder")
    names = list(peft_model.peft_config) if selected_adapters is None else list(selected_adapters)
    for name in names:
        peft_model.base_model.require_adapter(name)
    saved = {
        name: get_peft_model_state_dict(
            peft_model, state_dict, adapter_name=name, save_embedding_layers=save_embedding_layers
        )
        for name in names
    }
    if not is_main_process:
        return
    outputs: dict[str, tuple[AdapterConfig, dict[str, Any]]] = {}
    for name in names:  # every conversion is checked before anything is written
        config, tensors = peft_model.peft_config[name], saved[name]
        if path_initial_model_for_weight_conversion is not None:
            initial = load_weights(os.fspath(path_initial_model_for_weight_conversion))
            config, tensors = config.as_update_of_base(tensors, initial)
        outputs[name] = (config, tensors)
    root = os.fspath(save_directory)
    weights = SAFETENSORS_NAME if safe_serialization else BIN_NAME
    other = BIN_NAME if safe_serialization else SAFETENSORS_NAME
    folders = {name: "" if name == DEFAULT else name for name in names}
    # every adapter of this call in one transaction: after a crash the folder holds all old or all new;
    # the files are written straight into its staging folder, which is what makes them atomic
    with save_transaction(root, remove=[os.path.join(f, other) for f in folders.values()]) as staging:
        for name, sub in folders.items():
            folder = inside(staging, os.path.join(staging, sub))
            os.makedirs(folder, exist_ok=True)
            config, tensors = outputs[name]
            data = saved_config(peft_model, config)
            path = inside(folder, os.path.join(folder, weights))
            metadata = {CONFIG_DIGEST_KEY: config_digest(data)}
            write_weights(tensors, path, safe_serialization=safe_serialization, metadata=metadata)
            with open(inside(folder, os.path.join(folder, CONFIG_NAME)), "w", encoding="utf-8") as fh:
                fh.write(config_json(data))
        card = os.path.join(root, "README.md")
        if os.path.isfile(card):
            shutil.copyfile(card, os.path.join(staging, "README.md"))
        write_card(peft_model, staging)


def saved_config(peft_model: PeftModel, config: AdapterConfig) -> dict[str, Any]:
    """The adapter_config.json content of ``config`` as saved with ``peft_model`` (validated by its class)."""
    data = config.to_dict()
    data["inference_mode"] = True
    if data.get("base_model_name_or_path") is None:
        data["base_model_name_or_path"] = base_model_name(peft_model)
    if data.get("task_type") is None:  # for AutoPeftModel, as PEFT writes it
        base_class = type(peft_model.base_model.model)
        data["auto_mapping"] = {
            "base_model_class": base_class.__name__,
            "parent_library": base_class.__module__,
        }
    return type(config).from_dict(data).to_dict()


def write_card(peft_model: PeftModel, folder: str) -> None:
    """Create or update ``folder``'s README.md with the base model and the adapters' methods."""
    methods = sorted({c.peft_type for c in peft_model.peft_config.values()})
    write_model_card(folder, base_model=base_model_name(peft_model), methods=methods)
