"""Checking a saved LoKr adapter's tensor shapes against its config (for ``grafting inspect``)."""

from __future__ import annotations

from collections import defaultdict

from grafting_lokr.config import LoKrConfig

PREFIX = "base_model.model."
LOCAL_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def _w1_problems(module: str, parts: dict[str, tuple[int, ...]], config: LoKrConfig, r: int) -> list[str]:
    full, left, right = parts.get("lokr_w1"), parts.get("lokr_w1_a"), parts.get("lokr_w1_b")
    if full is not None and (left or right):
        return [f"{module}: holds lokr_w1 and its factors lokr_w1_a/b"]
    if full is not None:
        if len(full) != 2:
            return [f"{module}: lokr_w1 has shape {list(full)}, expected 2 dimensions"]
        if config.decompose_both and r < max(full) / 2:
            return [f"{module}: a whole lokr_w1 of shape {list(full)}, but decompose_both with r={r} factors it"]
        return []
    if left is None or right is None:
        return [f"{module}: needs lokr_w1, or lokr_w1_a with lokr_w1_b (found {sorted(parts)})"]
    if len(left) != 2 or len(right) != 2 or left[1] != r or right[0] != r:
        return [f"{module}: lokr_w1_a {list(left)} and lokr_w1_b {list(right)} do not have the config's rank r={r}"]
    if not config.decompose_both:
        return [f"{module}: lokr_w1 is factored (lokr_w1_a/b) but decompose_both is False"]
    return []


def _w2_problems(module: str, parts: dict[str, tuple[int, ...]], config: LoKrConfig, r: int) -> list[str]:
    full, left, right, core = (parts.get(k) for k in ("lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"))
    if full is not None and (left or right or core):
        return [f"{module}: holds lokr_w2 and factors of it (lokr_w2_a/b, lokr_t2)"]
    if full is not None:
        return [] if len(full) >= 2 else [f"{module}: lokr_w2 has shape {list(full)}, expected 2 or more dimensions"]
    if left is None or right is None:
        return [f"{module}: needs lokr_w2, or lokr_w2_a with lokr_w2_b (found {sorted(parts)})"]
    if core is not None:
        if not config.use_effective_conv2d:
            return [f"{module}: holds lokr_t2 but use_effective_conv2d is False"]
        if len(core) != 4 or core[:2] != (r, r) or left[0] != r or right[0] != r:
            return [
                f"{module}: lokr_t2 {list(core)}, lokr_w2_a {list(left)}, lokr_w2_b {list(right)} do not have r={r}"
            ]
        return []
    if len(left) != 2 or len(right) != 2 or left[1] != r or right[0] != r:
        return [f"{module}: lokr_w2_a {list(left)} and lokr_w2_b {list(right)} do not have the config's rank r={r}"]
    return []


def check_shapes(config: LoKrConfig, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """One line per tensor whose presence or shape contradicts the config (rank, decompose_both, effective conv)."""
    modules: dict[str, dict[str, tuple[int, ...]]] = defaultdict(dict)
    problems: list[str] = []
    for key, shape in shapes.items():
        path = key.removeprefix(PREFIX)
        module, _, local = path.rpartition(".")
        if local in LOCAL_NAMES:
            modules[module][local] = tuple(shape)
        elif ".lokr_" in path:
            problems.append(f"{key}: not a LoKr tensor name")
    for module, parts in sorted(modules.items()):
        r = config.rank_for(module)
        problems += _w1_problems(module, parts, config, r) + _w2_problems(module, parts, config, r)
    return problems
