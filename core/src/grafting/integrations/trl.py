"""TRL's trainers for grafting models: ``SFTTrainer``, ``DPOTrainer``, ``GRPOTrainer``, ``RewardTrainer``.

On top of :class:`~grafting.integrations.transformers.AdapterTrainerMixin`
(adapter-only checkpoints, resume, best model), two things TRL does for peft models:

* ``peft_config=``: TRL wraps the model with peft's ``get_peft_model`` (and refuses without peft).
  Given a grafting config, these classes load the model as TRL would (a model id with
  ``args.model_init_kwargs`` and ``quantization_config``), seed as TRL does, wrap it with
  grafting's ``get_peft_model`` and apply TRL's defaults for adapter models (input gradients
  under gradient checkpointing, bfloat16 adapter weights on a k-bit model) before TRL sees it.
  With ``args.chat_template_path`` naming a tokenizer, the template is cloned first (new tokens,
  resized embeddings) and, as TRL does for peft, the new tokens' embedding rows train
  (``trainable_token_indices``) and so does ``lm_head`` (``modules_to_save``).
* the fused LM head (per-token log-probabilities without the full logits) patches the *wrapped*
  transformers model, whose backbone and head it calls directly. TRL recognises only peft's class,
  so for a grafting model it patched the wrapper; these classes move the patch to the wrapped model::

    from grafting.integrations.trl import SFTTrainer  # instead of: from trl import SFTTrainer
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from typing import Any, ClassVar

import attrs
import torch
import transformers
import trl
from trl.trainer.utils import add_fused_lm_head, create_model_from_path, get_config_model_id

from grafting.api.factory import get_peft_model
from grafting.config import AdapterConfig
from grafting.errors import ConfigError, GraftingWarning
from grafting.integrations.transformers import AdapterTrainerMixin, adapter_model

#: The per-token outputs SFTTrainer asks its fused head for (its loss, entropy and accuracy metrics).
SFT_FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")


def _fused_head_options(forward: Any) -> dict[str, Any]:
    """The options TRL's ``add_fused_lm_head`` patched ``forward`` with (outputs, temperature, ...)."""
    function = getattr(forward, "__func__", forward)
    try:
        nonlocals = inspect.getclosurevars(function).nonlocals
    except TypeError:
        return {}
    names = inspect.signature(add_fused_lm_head).parameters
    return {k: v for k, v in nonlocals.items() if k in names and k != "model"}


def move_fused_head(model: Any) -> None:
    """Move TRL's fused-head patch from a grafting wrapper to the transformers model it wraps."""
    peft_model = adapter_model(model)
    if peft_model is None or "forward" not in vars(peft_model):
        return
    options = _fused_head_options(vars(peft_model)["forward"])
    del peft_model.forward  # TRL's patch on the wrapper: the class's forward is back
    add_fused_lm_head(peft_model.get_base_model(), **options)


def clone_template(model: Any, args: Any, processing: Any, loader: Any) -> tuple[Any, Any, list[int]]:
    """TRL's ``clone_chat_template`` from ``args.chat_template_path``, done before the model is wrapped.

    Returns the model, the processing class and the added token ids (none for a ``.jinja`` file,
    which TRL applies itself). ``args.chat_template_path`` is cleared (TRL would clone again, onto
    the wrapped model), and so is ``args.eos_token``: TRL sets it before cloning, which replaces it
    with the template's end token, so the result is the same.
    """
    path = getattr(args, "chat_template_path", None)
    if path is None or (os.path.isfile(path) and path.endswith((".jinja", ".j2"))):
        return model, processing, []
    if processing is None:
        processing = loader.from_pretrained(get_config_model_id(model.config), trust_remote_code=args.trust_remote_code)
    model, processing, added = trl.clone_chat_template(model, processing, path)
    args.chat_template_path = None
    args.eos_token = None
    return model, processing, list(added)


def _has_lm_head(model: Any) -> bool:
    return any(name == "lm_head" or name.endswith(".lm_head") for name, _ in model.named_modules())


def with_added_tokens(config: AdapterConfig, added: list[int], model: Any) -> AdapterConfig:
    """``config`` with the cloned template's new tokens trainable, as TRL makes them for peft.

    The ids join ``trainable_token_indices["embed_tokens"]`` and ``lm_head`` joins
    ``modules_to_save`` (where the model has one; with a warning when the user had not put it there).
    A copy: the user's config is left as it was.
    """
    if not added:
        return config
    if "trainable_token_indices" not in attrs.fields_dict(type(config)):
        raise ConfigError(
            f"{type(config).__name__}: cloning the chat template added {len(added)} tokens, whose embedding rows"
            f" must train (TRL gives them to trainable_token_indices), which {config.peft_type} does not take;"
            " use a LoraConfig, or a .jinja chat_template_path whose tokens are already in the vocabulary"
        )
    indices = config.trainable_token_indices  # type: ignore[attr-defined]
    if indices is None:
        indices = {"embed_tokens": list(added)}
    elif isinstance(indices, dict):
        indices = {**indices, "embed_tokens": [*indices.get("embed_tokens", []), *added]}
    else:  # a list means the input embedding: keep it there
        indices = {"embed_tokens": [*indices, *added]}
    saved = list(config.modules_to_save or [])
    if _has_lm_head(model) and "lm_head" not in saved:
        warnings.warn(
            "Cloning chat template added new tokens to the tokenizer, but 'lm_head' is not in PEFT's"
            " `modules_to_save`: grafting adds it, as TRL does (without it the model could not learn to generate"
            " the new tokens); put `modules_to_save=['lm_head']` in the config to silence this",
            GraftingWarning,
            stacklevel=4,
        )
        saved.append("lm_head")
    return attrs.evolve(config, trainable_token_indices=indices, modules_to_save=saved or None)  # type: ignore[call-arg]


class PeftConfigMixin:
    """Accepts a grafting config as ``peft_config=``; put before the TRL trainer class.

    ``arguments`` is the trainer's config class, ``run_name`` the suffix of TRL's default output
    folder, ``init_kwargs`` what TRL adds to ``model_init_kwargs`` when it loads a model id.
    """

    arguments: ClassVar[type]
    run_name: ClassVar[str]
    architecture: ClassVar[Any] = None
    init_kwargs: ClassVar[dict[str, Any]] = {}
    #: How TRL loads a missing processing class from the model id.
    processing_loader: ClassVar[Any] = transformers.AutoProcessor

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        trainer = next(c for c in type(self).__mro__ if c.__module__.startswith("trl."))
        bound = inspect.signature(vars(trainer)["__init__"]).bind(self, *args, **kwargs)
        values = bound.arguments
        if isinstance(values.get("peft_config"), AdapterConfig):
            if values.get("args") is None:
                model = values["model"]
                name = model if isinstance(model, str) else get_config_model_id(model.config)
                values["args"] = self.arguments(f"{name.split('/')[-1]}-{self.run_name}")
            values["model"], processing = self._adapt(
                values["model"],
                values["args"],
                values.pop("peft_config"),
                values.pop("quantization_config", None),
                values.get("processing_class"),
            )
            if processing is not None:
                values["processing_class"] = processing
        super().__init__(*bound.args[1:], **bound.kwargs)  # type: ignore[call-arg]

    def _adapt(
        self, model: Any, args: Any, config: AdapterConfig, quantization: Any, processing: Any
    ) -> tuple[Any, Any]:
        """What TRL does with ``peft_config`` for peft, with grafting's ``get_peft_model``: (model, processing)."""
        transformers.set_seed(args.seed)  # as TRL: the adapter's initialisation is seeded
        if isinstance(model, str):
            init = {**self.init_kwargs, **(args.model_init_kwargs or {})}
            if quantization is not None:
                init["quantization_config"] = quantization
            if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
                init["device_map"] = None
            init.setdefault("trust_remote_code", args.trust_remote_code)
            model = create_model_from_path(model, self.architecture, **init)
            args.model_init_kwargs = None  # used here: TRL would warn that they are ignored
        quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
        # ZeRO-3 wants one dtype for base and adapter (as TRL passes it to peft)
        zero3 = args.deepspeed_plugin is not None and args.deepspeed_plugin.zero_stage == 3
        model, processing, added = clone_template(model, args, processing, self.processing_loader)
        config = with_added_tokens(config, added, model)
        model = get_peft_model(model, config, autocast_adapter_dtype=not (zero3 and not quantized))
        if args.gradient_checkpointing:
            model.enable_input_require_grads()
        if quantized:  # QLoRA's recipe, as TRL applies it: bfloat16 adapters, DoRA's magnitude kept wide
            for name, param in model.named_parameters():
                if param.requires_grad and "lora_magnitude_vector" not in name:
                    param.data = param.data.to(torch.bfloat16)
        return model, processing


class SFTTrainer(AdapterTrainerMixin, PeftConfigMixin, trl.SFTTrainer):
    """``trl.SFTTrainer`` that trains, checkpoints, resumes and saves grafting models as peft models."""

    arguments = trl.SFTConfig
    run_name = "SFT"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        move_fused_head(self.model)


__all__ = ["PeftConfigMixin", "SFTTrainer", "clone_template", "move_fused_head", "with_added_tokens"]

with contextlib.suppress(ImportError, AttributeError):

    class DPOTrainer(AdapterTrainerMixin, PeftConfigMixin, trl.DPOTrainer):
        """``trl.DPOTrainer`` for grafting models (``peft_config=`` a grafting config)."""

        arguments = trl.DPOConfig
        run_name = "DPO"

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            move_fused_head(self.model)

    __all__ += ["DPOTrainer"]

with contextlib.suppress(ImportError, AttributeError):

    class GRPOTrainer(AdapterTrainerMixin, PeftConfigMixin, trl.GRPOTrainer):
        """``trl.GRPOTrainer`` for grafting models (``peft_config=`` a grafting config)."""

        arguments = trl.GRPOConfig
        run_name = "GRPO"

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            move_fused_head(self.model)

    __all__ += ["GRPOTrainer"]

with contextlib.suppress(ImportError, AttributeError):

    class RewardTrainer(AdapterTrainerMixin, PeftConfigMixin, trl.RewardTrainer):
        """``trl.RewardTrainer`` for grafting models (``peft_config=`` a grafting config)."""

        arguments = trl.RewardConfig
        run_name = "Reward"
        architecture = transformers.AutoModelForSequenceClassification
        processing_loader = transformers.AutoTokenizer
        init_kwargs: ClassVar[dict[str, Any]] = {"num_labels": 1}

    __all__ += ["RewardTrainer"]
