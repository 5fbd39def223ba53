"""Checking a saved VeRA adapter's tensor shapes against its config (for ``grafting inspect``)."""

from __future__ import annotations

from grafting_vera.config import VeraConfig

SHARED = ("base_model.vera_A", "base_model.vera_B")


def check_shapes(config: VeraConfig, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """One line per tensor whose presence or shape contradicts the config (r, save_projection, sizes)."""
    problems: list[str] = []
    r = config.r
    a, b = shapes.get(SHARED[0]), shapes.get(SHARED[1])
    if config.save_projection and (a is None or b is None):
        problems.append("save_projection is set but base_model.vera_A/vera_B are missing")
    if not config.save_projection and (a is not None or b is not None):
        problems.append("save_projection is False but the file holds base_model.vera_A/vera_B")
    if a is not None and (len(a) != 2 or a[0] != r):
        problems.append(f"base_model.vera_A has shape {list(a)}, but the config says r={r} (expected [{r}, in])")
    if b is not None and (len(b) != 2 or b[1] != r):
        problems.append(f"base_model.vera_B has shape {list(b)}, but the config says r={r} (expected [out, {r}])")
    for key, shape in sorted(shapes.items()):
        if key.endswith(".vera_lambda_d") and shape != (r,):
            problems.append(f"{key}: shape {list(shape)}, but the config says r={r}")
        if key.endswith(".vera_lambda_b") and b is not None and (len(shape) != 1 or shape[0] > b[0]):
            problems.append(f"{key}: {list(shape)} outputs, more than vera_B's {b[0]} rows")
    return problems
