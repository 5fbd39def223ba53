"""Tokenize, batch, train and evaluate: the demo's steps, for any causal LM and tokenizer."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from demo.task import INSTRUCTION, target_text


def prompt_ids(tokenizer: Any, text: str, instruction: str = INSTRUCTION) -> list[int]:
    """The model's input for one sentence: its chat template if it has one, else a plain prompt."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": instruction}, {"role": "user", "content": text}]
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
        return list(ids)
    return list(tokenizer(f"{instruction}\nRequest: {text}\nJSON: ", add_special_tokens=True)["input_ids"])


def answer_ids(tokenizer: Any, record: dict[str, Any]) -> list[int]:
    """The answer's tokens followed by the end-of-sequence token, which ends generation."""
    return [*tokenizer(target_text(record), add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


def encode(
    tokenizer: Any, rows: list[dict[str, Any]], instruction: str = INSTRUCTION
) -> list[tuple[list[int], list[int]]]:
    """(prompt, answer) token lists for training rows."""
    return [(prompt_ids(tokenizer, r["text"], instruction), answer_ids(tokenizer, r["record"])) for r in rows]


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, so every sequence ends at the last position."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, width - len(seq) :] = torch.tensor(seq)
            mask[i, width - len(seq) :] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (as generate computes them)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def answer_loss(
    model: nn.Module,
    batch: list[tuple[list[int], list[int]]],
    pad_id: int,
    adapter_names: list[str] | None = None,
) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens only.

    Sequences are left-padded, so all answers end at the last position and the
    output layer runs on the last ``longest answer + 1`` positions alone.
    ``adapter_names`` (a grafting model's per-sample routing) sends sample ``i``
    through adapter ``adapter_names[i]``.
    """
    ids, mask = left_pad([p + a for p, a in batch], pad_id)
    span = max(len(a) for _, a in batch)
    routing = {} if adapter_names is None else {"adapter_names": adapter_names}
    logits = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions(mask),
        logits_to_keep=span + 1,
        use_cache=False,
        **routing,
    ).logits[:, :-1]
    labels = ids[:, -span:].clone()
    for i, (_, answer) in enumerate(batch):
        labels[i, : span - len(answer)] = -100
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))


def train(
    model: nn.Module,
    examples: list[tuple[list[int], list[int]]],
    *,
    pad_id: int,
    steps: int,
    batch_size: int = 8,
    lr: float = 1e-3,
    warmup: int = 5,
    seed: int = 0,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    adapter_names: list[str] | None = None,
) -> list[float]:
    """AdamW on the trainable parameters with warm-up then cosine decay; returns the loss of every step.

    With ``adapter_names`` (one per example) each sample is routed to its own adapter.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    rng = random.Random(seed)
    order: list[int] = []
    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc="training", unit="step", disable=not progress)
    for step in bar:
        if len(order) < batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order += fresh
        batch = [examples[i] for i in order[:batch_size]]
        names = None if adapter_names is None else [adapter_names[i] for i in order[:batch_size]]
        del order[:batch_size]
        loss = answer_loss(model, batch, pad_id, names)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: Any,
    texts: list[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 50,
    progress: bool = True,
    desc: str = "evaluating",
    instructions: list[str] | None = None,
    adapter_names: list[str] | None = None,
) -> list[str]:
    """Greedy answers for each sentence, decoded without special tokens.

    ``instructions`` (one per sentence; default the calendar task's) and
    ``adapter_names`` (per-sample routing in a grafting model) mix tasks in one batch.
    """
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        stop = start + batch_size
        told = instructions[start:stop] if instructions is not None else [INSTRUCTION] * len(texts[start:stop])
        prompts = [prompt_ids(tokenizer, t, i) for t, i in zip(texts[start:stop], told)]
        ids, mask = left_pad(prompts, pad_id)
        routing = {} if adapter_names is None else {"adapter_names": adapter_names[start:stop]}
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            **routing,
        )
        answers += tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in answers]
