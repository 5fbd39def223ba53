"""What the virtual-token adapters share: an encoder of (tokens, width) and PEFT's saved form of it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from grafting import AdapterLoadError, ModelAdapter
from grafting_prefix.encoders import PromptTable

#: The one tensor PEFT saves for these methods: the encoder's output.
SAVED_KEY = "prompt_embeddings"


@contextlib.contextmanager
def _evaluating(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class VirtualTokenAdapter(ModelAdapter):
    """A model-level adapter whose state is ``encoder() -> (num_virtual_tokens, width)``.

    It saves the encoder's output, computed in eval mode, as
    ``prompt_embeddings``. Loading puts that tensor in a
    :class:`PromptTable`, replacing a trained encoder (whose weights PEFT's
    format does not keep); the loaded adapter computes what the saved one did.
    """

    def __init__(self, encoder: nn.Module, *, method: str, rows: int, width: int, device: torch.device) -> None:
        super().__init__()
        self.encoder = encoder
        self.method = method
        self.shape = (rows, width)
        self.device_hint = device  # where a table loaded onto meta tensors goes

    @property
    def num_virtual_tokens(self) -> int:
        return self.shape[0]

    def tokens(self) -> torch.Tensor:
        """The virtual tokens, (num_virtual_tokens, width)."""
        return self.encoder()

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        if any(p.is_meta for p in self.encoder.parameters()):
            return {SAVED_KEY: torch.empty(self.shape, device="meta")}
        with torch.no_grad(), _evaluating(self.encoder):
            return {SAVED_KEY: self.tokens().detach()}

    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        value = state[SAVED_KEY]
        if tuple(value.shape) != self.shape:
            raise AdapterLoadError(
                f"{self.method}: {SAVED_KEY} has shape {tuple(value.shape)} in the file but the adapter needs"
                f" {self.shape} (num_virtual_tokens, width); is the config the one it was saved with?"
            )
        like = next(self.encoder.parameters())
        if isinstance(self.encoder, PromptTable) and not like.is_meta:
            with torch.no_grad():
                like.copy_(value.to(device=like.device, dtype=like.dtype))
        else:
            self.encoder = PromptTable.holding(value, like=like, device=self.device_hint)
