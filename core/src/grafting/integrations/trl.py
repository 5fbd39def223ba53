"""TRL's ``SFTTrainer`` for grafting models.

On top of :class:`~grafting.integrations.transformers.AdapterTrainerMixin`
(adapter-only checkpoints, resume, best model), one thing TRL does for peft
models: its fused LM head (per-token log-probabilities computed without the
full logits) patches the *wrapped* transformers model, whose backbone and head
it calls directly. TRL recognises only peft's class, so for a grafting model it
patched the wrapper; this class moves the patch to the wrapped model::

    from grafting.integrations.trl import SFTTrainer  # instead of: from trl import SFTTrainer
"""

from __future__ import annotations

from typing import Any

import trl
from trl.trainer.utils import add_fused_lm_head

from grafting.integrations.transformers import AdapterTrainerMixin, adapter_model

#: The per-token outputs SFTTrainer asks its fused head for (its loss, entropy and accuracy metrics).
SFT_FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")


class SFTTrainer(AdapterTrainerMixin, trl.SFTTrainer):
    """``trl.SFTTrainer`` that trains, checkpoints, resumes and saves grafting models as peft models."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        peft_model = adapter_model(self.model)
        if peft_model is not None and "forward" in vars(peft_model):
            del peft_model.forward  # TRL's patch on the wrapper: the class's forward is back
            add_fused_lm_head(peft_model.get_base_model(), outputs=SFT_FUSED_OUTPUTS)


__all__ = ["SFTTrainer"]
