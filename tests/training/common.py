"""Pieces shared by the training scenarios: a peft blocker, an offline tokenizer, data, the model."""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch

VOCAB = 64  # grafting.testing.tiny_llama's vocabulary
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}


def block_peft() -> None:
    """Make ``import peft`` fail in this process, as if peft were not installed.

    Must run before transformers, accelerate or TRL are imported: they decide once, at import, whether
    peft is available (``importlib.util.find_spec`` answers ``None`` for a module set to ``None`` here).
    """
    if "transformers" in sys.modules or ("peft" in sys.modules and sys.modules["peft"] is not None):
        raise RuntimeError("block_peft() must run before transformers or peft is imported")
    sys.modules["peft"] = None  # type: ignore[assignment]


def peft_blocked() -> dict[str, Any]:
    """Evidence that this process trains without peft: the import fails and the libraries say so."""
    import accelerate.utils
    import transformers.utils

    try:
        import peft  # noqa: F401

        importable = True
    except ImportError:
        importable = False
    return {
        "import_peft": importable,
        "transformers_is_peft_available": transformers.utils.is_peft_available(),
        "accelerate_is_peft_available": bool(accelerate.utils.is_peft_available()),
    }


def tokenizer() -> Any:
    """A word-level tokenizer over ``w0 .. w59`` plus four special tokens: 64 ids, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL + [f"w{i}" for i in range(VOCAB - len(SPECIAL))]
    model = models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    core = Tokenizer(model)
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def texts(n: int, seed: int) -> list[str]:
    """``n`` sentences of 6-10 words with a learnable pattern (each word is followed by the next one)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = int(torch.randint(0, 40, (1,), generator=gen))
        length = int(torch.randint(6, 11, (1,), generator=gen))
        out.append(" ".join(f"w{start + i}" for i in range(length)))
    return out


#: Tokens the cloned chat template brings (not in :func:`tokenizer`'s vocabulary).
TEMPLATE_TOKENS = ["<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def chat_template_source(out: str) -> str:
    """A tokenizer folder (offline) whose chat template uses :data:`TEMPLATE_TOKENS`: TRL's ``chat_template_path``."""
    folder = os.path.join(out, "template")
    source = tokenizer()
    source.add_special_tokens({"additional_special_tokens": TEMPLATE_TOKENS})
    source.eos_token = TEMPLATE_TOKENS[1]
    source.chat_template = CHAT_TEMPLATE
    source.save_pretrained(folder)
    return folder


def conversations(n: int, seed: int) -> Any:
    """``n`` two-turn conversations of :func:`texts` (a ``messages`` column)."""
    from datasets import Dataset

    rows = texts(2 * n, seed)
    return Dataset.from_dict(
        {
            "messages": [
                [{"role": "user", "content": rows[2 * i]}, {"role": "assistant", "content": rows[2 * i + 1]}]
                for i in range(n)
            ]
        }
    )


def lm_dataset(n: int, seed: int) -> Any:
    """A ``datasets.Dataset`` of ``input_ids``/``attention_mask``/``labels`` (same length rows) and a text column."""
    from datasets import Dataset

    tok = tokenizer()
    rows = texts(n, seed)
    enc = tok(rows, padding="max_length", max_length=10, truncation=True)
    labels = [
        [t if m else -100 for t, m in zip(ids, mask)] for ids, mask in zip(enc["input_ids"], enc["attention_mask"])
    ]
    return Dataset.from_dict(
        {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels, "text": rows}
    )


def probe_inputs() -> dict[str, torch.Tensor]:
    """The fixed batch whose logits the tests compare across libraries and ranks."""
    ids = torch.tensor([[4, 5, 6, 7, 8, 9], [20, 21, 22, 23, 24, 25]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def base_model() -> Any:
    """The base model every scenario adapts and every check loads adapters onto: the seeded tiny Llama."""
    from grafting.testing import tiny_llama

    return tiny_llama(seed=0)


def lora_model(seed: int = 0) -> Any:
    """grafting's LoRA on :func:`base_model`, B initialised to zero as usual (training moves it)."""
    import grafting

    base = base_model()
    torch.manual_seed(seed)
    return grafting.get_peft_model(base, grafting.LoraConfig(**LORA))


def probe_logits(model: Any) -> torch.Tensor:
    """``model``'s logits for :func:`probe_inputs`, in eval mode, without autograd."""
    model.eval()
    with torch.no_grad():
        return model(**probe_inputs()).logits


def trainer_args(folder: str, arguments: Any = None, **options: Any) -> Any:
    """Arguments for a quiet, seeded CPU run in ``folder``; ``options`` add to or override them.

    ``arguments``: the class (``TrainingArguments`` unless given, e.g. TRL's ``SFTConfig``).
    """
    from transformers import TrainingArguments

    quiet = {"report_to": [], "use_cpu": True, "disable_tqdm": True, "seed": 0, "dataloader_num_workers": 0}
    return (arguments or TrainingArguments)(output_dir=str(folder), **{**quiet, **options})


def run_scenarios(out: str, names: list[str], scenarios: dict[str, Callable[[str], dict[str, Any]]]) -> None:
    """Run the named scenarios (all when none is named), each into ``out/<name>``, leaving its ``result.json``.

    A scenario's failure is recorded there with its traceback and the next one still runs; every result
    says whether peft was importable (:func:`peft_blocked`).
    """
    torch.set_num_threads(1)
    blocked = peft_blocked()
    for name in names or list(scenarios):
        folder = os.path.join(out, name)
        os.makedirs(folder, exist_ok=True)
        try:
            result: dict[str, Any] = {"ok": True, **scenarios[name](folder)}
        except Exception:
            result = {"ok": False, "error": traceback.format_exc()}
        result["peft"] = blocked
        with open(os.path.join(folder, "result.json"), "w", encoding="utf-8") as fh:
            json.dump(result, fh, default=str, indent=1)
