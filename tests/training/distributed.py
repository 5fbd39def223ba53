"""DDP and FSDP2 training of a grafting model on two CPU processes (gloo), peft blocked.

``torchrun --standalone --nproc_per_node 2 -m tests.training.distributed OUT``. Each mode trains a few
steps on rank-specific batches, then every rank writes its view of the adapter (``rank<r>.safetensors``)
and of the probe batch's logits (``logits<r>.safetensors``) so the test can check that the ranks agree,
and the adapter is saved as documented in the README:

* DDP: ``model.module.save_pretrained(dir, is_main_process=rank == 0)``;
* FSDP2: ``model.save_pretrained(dir, is_main_process=rank == 0)`` called on every rank (the sharded
  adapter tensors are gathered), and the usual recipe of a full state dict gathered to rank 0
  (``get_model_state_dict(..., full_state_dict=True, cpu_offload=True)``) saved with ``state_dict=``;
* grafting's ``Trainer`` launched by torchrun (DDP; accelerate offers FSDP on GPUs only): checkpoints,
  resume from one, ``save_model``.
"""

from __future__ import annotations

from tests.training.common import block_peft

if __name__ == "__main__":
    block_peft()

import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from grafting import get_peft_model_state_dict
from tests.training.common import lora_model, peft_blocked, probe_logits

STEPS = 3


def train(model: Any, rank: int) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-2)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own batches: only synchronization makes them agree
    model.train()
    for _ in range(STEPS):
        ids = torch.randint(4, 64, (2, 8), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def record(model: Any, peft_model: Any, folder: str, rank: int) -> None:
    """This rank's adapter tensors (gathered whole under FSDP2) and probe logits."""
    tensors = get_peft_model_state_dict(peft_model)  # a collective under FSDP2: every rank calls
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, f"rank{rank}.safetensors"))
    save_file({"logits": probe_logits(model).contiguous()}, os.path.join(folder, f"logits{rank}.safetensors"))


def ddp(out: str, rank: int) -> None:
    from torch.nn.parallel import DistributedDataParallel

    folder = os.path.join(out, "ddp")
    os.makedirs(folder, exist_ok=True)
    model = DistributedDataParallel(lora_model())
    train(model, rank)
    record(model, model.module, folder, rank)
    model.module.save_pretrained(os.path.join(folder, "adapter"), is_main_process=rank == 0)


def fsdp2(out: str, rank: int) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    folder = os.path.join(out, "fsdp2")
    os.makedirs(folder, exist_ok=True)
    model = lora_model()
    for layer in model.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(model)
    train(model, rank)
    record(model, model, folder, rank)
    model.save_pretrained(os.path.join(folder, "adapter"), is_main_process=rank == 0)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(os.path.join(folder, "adapter_from_full_state_dict"), state_dict=full)


def trainer_ddp(out: str, rank: int) -> None:
    """grafting's Trainer under torchrun (DDP: accelerate enables FSDP on GPUs only): checkpoints, resume, save_model."""
    from grafting.integrations.transformers import Trainer
    from tests.training.common import lm_dataset, tokenizer, trainer_args

    folder = os.path.join(out, "trainer_ddp")

    def run(name: str, seed: int, resume: str | None = None) -> Any:
        args = trainer_args(
            os.path.join(folder, name), max_steps=4, save_steps=2, per_device_train_batch_size=2, learning_rate=5e-2
        )
        trainer = Trainer(
            model=lora_model(seed), args=args, train_dataset=lm_dataset(16, 8), processing_class=tokenizer()
        )
        trainer.train(resume_from_checkpoint=resume)
        assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
        return trainer

    trainer = run("run", 0)
    trainer.save_model(os.path.join(folder, "final"))
    record(trainer.model, trainer.model, folder, rank)
    run("resumed", 123, resume=os.path.join(folder, "run", "checkpoint-2"))


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    with open(os.path.join(out, f"peft{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump(peft_blocked(), fh)
    try:
        ddp(out, rank)
        dist.barrier()
        fsdp2(out, rank)
        dist.barrier()
        trainer_ddp(out, rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
