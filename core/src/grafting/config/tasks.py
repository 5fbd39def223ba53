"""The task table: what each ``task_type`` means to the wrappers, the tuner, the auto classes and the CLI.

One row per :class:`TaskType`, so a task's facts live in one place: the transformers auto class that
loads its base model, the inputs PEFT's class for the task declares in its ``forward`` signature
(``Trainer`` reads dataset columns and label names from it), and the heads trained in full beside
the adapter (PEFT adds them to ``modules_to_save``).
"""

from __future__ import annotations

import attrs

from grafting.config.adapter_config import TaskType

_COMMON_TAIL = ("output_attentions", "output_hidden_states", "return_dict", "task_ids")
_LM_INPUTS = ("input_ids", "attention_mask", "inputs_embeds", "labels", *_COMMON_TAIL)
_CLASSIFIER_HEADS = ("classifier", "score")


@attrs.frozen
class Task:
    """One task type's row of the table."""

    task_type: TaskType
    auto_class: str  #: the transformers auto class that loads the base model
    inputs: tuple[str, ...]  #: the forward inputs PEFT's task class declares, in order
    heads: tuple[str, ...] = ()  #: modules trained in full beside the adapter


TASKS: dict[str, Task] = {
    task.task_type.value: task
    for task in (
        Task(TaskType.CAUSAL_LM, "AutoModelForCausalLM", _LM_INPUTS),
        Task(
            TaskType.SEQ_2_SEQ_LM,
            "AutoModelForSeq2SeqLM",
            (
                "input_ids",
                "attention_mask",
                "inputs_embeds",
                "decoder_input_ids",
                "decoder_attention_mask",
                "decoder_inputs_embeds",
                "labels",
                *_COMMON_TAIL,
            ),
        ),
        Task(TaskType.SEQ_CLS, "AutoModelForSequenceClassification", _LM_INPUTS, _CLASSIFIER_HEADS),
        Task(TaskType.TOKEN_CLS, "AutoModelForTokenClassification", _LM_INPUTS, _CLASSIFIER_HEADS),
        Task(
            TaskType.QUESTION_ANS,
            "AutoModelForQuestionAnswering",
            (
                "input_ids",
                "attention_mask",
                "token_type_ids",
                "position_ids",
                "inputs_embeds",
                "start_positions",
                "end_positions",
                *_COMMON_TAIL,
            ),
            ("qa_outputs",),
        ),
        Task(
            TaskType.FEATURE_EXTRACTION,
            "AutoModel",
            ("input_ids", "attention_mask", "inputs_embeds", *_COMMON_TAIL),
        ),
    )
}


def task_of(task_type: str | None) -> Task | None:
    """The row of ``task_type``, or ``None`` for no task type or one the table does not know."""
    return TASKS.get(task_type or "")
