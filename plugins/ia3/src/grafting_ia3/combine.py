"""IA3's ``add_weighted_adapter``: the new vector is the weighted sum of the sources' vectors (PEFT's rule)."""

from __future__ import annotations

import attrs
import torch
from torch import nn

from grafting import CombinationError
from grafting.protocol import Combination, CombineRequest
from grafting.toolkit import union_of_targets
from grafting_ia3.config import IA3Config
from grafting_ia3.layers import IA3Adapter

#: IA3 has one combination; the request's default (``"svd"``, LoRA's) and ``"linear"`` both name it.
ACCEPTED_TYPES = ("svd", "linear")


def combination(request: CombineRequest, model: nn.Module) -> Combination | None:
    """The new IA3 adapter's config and filler, or ``None`` if the sources are not all IA3."""
    configs = request.configs
    if not all(isinstance(c, IA3Config) for c in configs):
        return None
    if request.combination_type not in ACCEPTED_TYPES:
        raise CombinationError(
            f"IA3 combines its vectors linearly only; combination_type={request.combination_type!r} does not apply"
        )
    unused = {"svd_rank": request.svd_rank, "svd_clamp": request.svd_clamp, "density": request.density}
    given = sorted(k for k, v in unused.items() if v is not None)
    if given:
        raise CombinationError(f"IA3 combines its vectors linearly; {given} do not apply")
    feedforward = [c.feedforward_for(model) for c in configs]  # type: ignore[attr-defined]
    config = attrs.evolve(
        configs[0],
        target_modules=union_of_targets([c.target_modules for c in configs]),  # type: ignore[misc]
        feedforward_modules=union_of_targets(feedforward, "feedforward_modules"),
    )

    def fill(target: nn.Module, sources: list[tuple[nn.Module, float]]) -> None:
        assert isinstance(target, IA3Adapter)
        for source, _ in sources:
            if not isinstance(source, IA3Adapter) or source.scales_input != target.scales_input:
                raise CombinationError(
                    f"{target.where}: the adapters scale this layer on different sides (input and output);"
                    " give them the same feedforward_modules"
                )
        total = torch.zeros_like(target.ia3_l)
        for source, weight in sources:
            total += source.ia3_l.detach().to(total.dtype) * weight
        target.ia3_l.copy_(total)

    return Combination(config, fill)
