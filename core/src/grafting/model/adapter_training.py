"""Adapter-level training behaviour: a shared state's loss term and its per-step update.

The core asks each adapter's :class:`~grafting.protocol.SharedState` for
:meth:`~grafting.protocol.SharedState.loss_term` after a forward that returned a
loss, and calls :meth:`~grafting.protocol.SharedState.on_optimizer_step` once per
optimizer step; the method decides what they do (AdaLoRA: an orthogonality
regulariser, rank allocation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch

from grafting.model.matching import logical_path

if TYPE_CHECKING:
    from grafting.model.tuner import AdapterModel
    from grafting.protocol import LayerAdapter, SharedState


def adapter_layers(tuner: AdapterModel, adapter_name: str) -> dict[str, LayerAdapter]:
    """Adapter ``adapter_name``'s layer adapters by logical module name, in model order."""
    return {
        logical_path(tuner.model, path): cast("LayerAdapter", layer.adapters[adapter_name])
        for path, layer in tuner.adapted_layers()
        if adapter_name in layer.adapters
    }


def add_loss_terms(tuner: AdapterModel, outputs: Any) -> Any:
    """``outputs`` with every active, trainable adapter's loss term added to ``outputs.loss``."""
    loss = getattr(outputs, "loss", None)
    if not isinstance(loss, torch.Tensor) or tuner.disabled:
        return outputs
    for name in tuner.active_adapters:
        if name in tuner.shared_states and name in tuner.trainable_adapters:
            term = cast("SharedState", tuner.shared_states[name]).loss_term(adapter_layers(tuner, name))
            if term is not None:
                loss = loss + term.to(loss.dtype)
    if loss is not outputs.loss:
        outputs.loss = loss
    return outputs


def on_optimizer_step(tuner: AdapterModel, global_step: int) -> None:
    """Give every trainable adapter's shared state the step (after ``optimizer.step()``, before ``zero_grad``)."""
    for name in sorted(tuner.trainable_adapters):
        if name in tuner.shared_states:
            cast("SharedState", tuner.shared_states[name]).on_optimizer_step(adapter_layers(tuner, name), global_step)
