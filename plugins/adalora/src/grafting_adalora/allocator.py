"""AdaLoRA's adapter-wide training behaviour: the orthogonality regulariser and the rank allocator.

A :class:`grafting.SharedState` with no tensors of its own (nothing is saved for it): the
core asks it for the loss term after each forward that returns a loss and calls
:meth:`RankAllocator.on_optimizer_step` after each optimizer step, with the adapter's
layers by logical module name. Importance of an entry is ``|p · ∇p|``, smoothed by an
exponential moving average (``beta1``) and weighted by the smoothed deviation from it
(``beta2``, the uncertainty); a rank's score is its ``E`` entry's plus the mean scores of
its row of ``A`` and its column of ``B``.
"""

from __future__ import annotations

import math

import torch

from grafting import SharedState
from grafting_adalora.config import AdaLoraConfig
from grafting_adalora.layers import AdaLoraAdapter

Layers = dict[str, AdaLoraAdapter]


class RankAllocator(SharedState):
    """Allocates one AdaLoRA adapter's ranks; writes the result to ``config.rank_pattern``."""

    def __init__(self, config: AdaLoraConfig) -> None:
        super().__init__()
        self.config = config
        self.reset_importance()

    def reset_importance(self) -> None:
        #: (module, factor) -> smoothed sensitivity and uncertainty of each entry
        self.sensitivity: dict[tuple[str, str], torch.Tensor] = {}
        self.uncertainty: dict[tuple[str, str], torch.Tensor] = {}

    # -- the regulariser ---------------------------------------------------------------
    def loss_term(self, layers: Layers) -> torch.Tensor | None:  # type: ignore[override]
        """``orth_reg_weight`` × the mean of ``‖AAᵀ − I‖_F`` and ``‖BᵀB − I‖_F`` over the layers.

        On a layer grown for hot-swapping (``pad_rank``), ``I`` has ones only at the ranks in use: a padded
        rank (a zero row of ``A`` and a zero column of ``B``) is no rank, and a one there would both shift
        the term and weaken its gradient under the norm's square root.
        """
        if self.config.orth_reg_weight == 0 or not layers:
            return None
        norms = []
        for adapter in layers.values():
            a, b = adapter.lora_A, adapter.lora_B
            eye = _identity(adapter)  # A's rows and B's columns are the same ranks
            for cov in (a @ a.T, b.T @ b):
                norms.append(torch.linalg.matrix_norm(cov - eye))
        return self.config.orth_reg_weight * (torch.stack(norms).sum() / len(norms))

    # -- the schedule -------------------------------------------------------------------
    def budget(self, step: int, initial: int, target: int) -> tuple[int, bool]:
        """The total number of ranks to keep at ``step`` and whether to mask to it now (cubic decay)."""
        c = self.config
        assert c.total_step is not None
        if step <= c.tinit:
            return initial, False
        if step > c.total_step - c.tfinal:
            return target, True
        left = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((initial - target) * left**3 + target), step % c.deltaT == 0

    def on_optimizer_step(self, layers: Layers, global_step: int) -> None:  # type: ignore[override]
        """PEFT's ``update_and_allocate``: track importance, mask to the budget, then fix the pattern."""
        c = self.config
        assert c.total_step is not None
        end = c.total_step - c.tfinal
        if global_step < end:
            self._track(layers)
            total = sum(a.rank for a in layers.values())
            budget, due = self.budget(global_step, total, c.target_r * len(layers))
            if due:
                c.rank_pattern = self._mask_to(layers, budget, total)
        elif global_step == end:
            total = sum(a.rank for a in layers.values())
            c.rank_pattern = self._mask_to(layers, c.target_r * len(layers), total)
            self.reset_importance()
        elif c.rank_pattern:
            self._apply_pattern(layers, c.rank_pattern)

    # -- importance and masking -----------------------------------------------------------
    @torch.no_grad()
    def _track(self, layers: Layers) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for name, adapter in layers.items():
            for factor in ("lora_A", "lora_B", "lora_E"):
                p = getattr(adapter, factor)
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                ipt = (p * grad).abs()
                key = (name, factor)
                smooth = self.sensitivity.get(key, torch.zeros_like(p))
                unc = self.uncertainty.get(key, torch.zeros_like(p))
                smooth = b1 * smooth + (1 - b1) * ipt
                self.sensitivity[key] = smooth
                self.uncertainty[key] = b2 * unc + (1 - b2) * (ipt - smooth).abs()

    def _score(self, name: str, factor: str, like: torch.Tensor) -> torch.Tensor:
        key = (name, factor)
        if key not in self.sensitivity:
            return torch.zeros_like(like)
        return self.sensitivity[key] * self.uncertainty[key]

    @torch.no_grad()
    def _mask_to(self, layers: Layers, budget: int, total: int) -> dict[str, list[bool]]:
        """Zero the ``E`` entries of all but the ``budget`` best-scoring ranks; the kept ranks by module."""
        scores = {}
        for name, a in layers.items():
            a_score = self._score(name, "lora_A", a.lora_A).mean(dim=1).view(-1)
            b_score = self._score(name, "lora_B", a.lora_B).mean(dim=0).view(-1)
            scores[name] = self._score(name, "lora_E", a.lora_E).view(-1) + (a_score + b_score)
        drop = total - budget
        threshold = -math.inf
        if drop > 0:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), k=drop)[0].item()
        pattern = {}
        for name, a in layers.items():
            pruned = (scores[name] <= threshold).view(-1, 1)
            a.lora_E.masked_fill_(pruned, 0.0)
            pattern[f"{name}.lora_E"] = (~pruned).view(-1).tolist()
        return pattern

    @torch.no_grad()
    def _apply_pattern(self, layers: Layers, pattern: dict[str, list[bool]]) -> None:
        for name, a in layers.items():
            kept = pattern.get(f"{name}.lora_E")
            if kept is not None and len(kept) == a.rank:
                keep = torch.tensor(kept, dtype=torch.bool, device=a.lora_E.device).view(-1, 1)
                a.lora_E.masked_fill_(~keep, 0.0)


def _identity(adapter: AdaLoraAdapter) -> torch.Tensor:
    """The identity the layer's rank covariances are held to: over the ranks in use where the layer was padded."""
    a, b = adapter.lora_A.detach(), adapter.lora_B.detach()
    if not adapter.rank_padded:
        return torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    in_use = (a != 0).any(dim=1) | (b != 0).any(dim=0)
    return torch.diag(in_use.to(a.dtype))
