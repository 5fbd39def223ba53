"""PeftModel's task classes: each declares PEFT's forward inputs for its task (:data:`grafting.config.tasks.TASKS`)."""

from __future__ import annotations

from grafting.api.peft_model import PeftModel
from grafting.api.signatures import keyword_forward
from grafting.config.adapter_config import TaskType
from grafting.config.tasks import TASKS


class PeftModelForCausalLM(PeftModel):
    """Decoder-only language models (``task_type="CAUSAL_LM"``)."""

    serves_task = TaskType.CAUSAL_LM.value
    forward = keyword_forward(TASKS[serves_task].inputs, PeftModel.forward)


class PeftModelForSeq2SeqLM(PeftModel):
    """Encoder-decoder language models (``task_type="SEQ_2_SEQ_LM"``)."""

    serves_task = TaskType.SEQ_2_SEQ_LM.value
    forward = keyword_forward(TASKS[serves_task].inputs, PeftModel.forward)


class PeftModelForSequenceClassification(PeftModel):
    """Sequence classification; the head (``classifier``/``score``) trains in full."""

    serves_task = TaskType.SEQ_CLS.value
    forward = keyword_forward(TASKS[serves_task].inputs, PeftModel.forward)


class PeftModelForTokenClassification(PeftModel):
    """Token classification; the head (``classifier``/``score``) trains in full."""

    serves_task = TaskType.TOKEN_CLS.value
    forward = keyword_forward(TASKS[serves_task].inputs, PeftModel.forward)


class PeftModelForQuestionAnswering(PeftModel):
    """Extractive question answering; ``qa_outputs`` trains in full."""

    serves_task = TaskType.QUESTION_ANS.value
    forward = keyword_forward(TASKS[serves_task].inputs, PeftModel.forward)


class PeftModelForFeatureExtraction(PeftModel):
    """Embedding models (``task_type="FEATURE_EXTRACTION"``)."""

    serves_task = TaskType.FEATURE_EXTRACTION.value
    forward = keyword_forward(TASKS[serves_task].inputs, PeftModel.forward)


#: The task classes by ``task_type``.
TASK_CLASSES: dict[str, type[PeftModel]] = {
    cls.serves_task: cls
    for cls in (
        PeftModelForCausalLM,
        PeftModelForSeq2SeqLM,
        PeftModelForSequenceClassification,
        PeftModelForTokenClassification,
        PeftModelForQuestionAnswering,
        PeftModelForFeatureExtraction,
    )
    if cls.serves_task is not None
}

__all__ = [
    "TASK_CLASSES",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
]
