"""Checking a saved LoRA adapter's tensor shapes against its config (for ``grafting inspect``)."""

from __future__ import annotations

from collections import defaultdict

from grafting_lora.config import LoraConfig

PREFIX = "base_model.model."
#: On-disk local names: (role, key suffix). A and B of linear/conv layers, of embeddings, and DoRA's vector.
LOCAL_NAMES = {
    "lora_A.weight": "A",
    "lora_B.weight": "B",
    "lora_B.bias": "bias",
    "lora_embedding_A": "A",
    "lora_embedding_B": "B",
    "lora_magnitude_vector": "magnitude",
}


def split_key(key: str) -> tuple[str, str] | None:
    """(module path, local name) for a LoRA key, or None for keys that are not LoRA's."""
    path = key.removeprefix(PREFIX)
    for local in LOCAL_NAMES:
        if path.endswith("." + local):
            return path[: -len(local) - 1], local
    if ".lora_" in path:
        module, _, local = path.partition(".lora_")
        return module, "lora_" + local
    return None


def _per_channel(shape: tuple[int, ...], out: int) -> bool:
    """A magnitude vector's shape: ``(out,)``, or ``(1, out, 1, ...)`` for a convolution."""
    shape = tuple(shape)
    return shape == (out,) or (len(shape) >= 3 and shape[:2] == (1, out) and set(shape[2:]) == {1})


def check_shapes(config: LoraConfig, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """One line per tensor whose presence or shape contradicts the config (rank, DoRA, lora_bias)."""
    modules: dict[str, dict[str, tuple[int, ...]]] = defaultdict(dict)
    problems: list[str] = []
    for key, shape in shapes.items():
        split = split_key(key)
        if split is None:
            continue
        module, local = split
        if local not in LOCAL_NAMES:
            problems.append(f"{key}: not a LoRA tensor name")
            continue
        modules[module][LOCAL_NAMES[local]] = shape
    for module, parts in sorted(modules.items()):
        r = config.rank_for(module)
        a, b = parts.get("A"), parts.get("B")
        if a is None or b is None:
            present, missing = ("A", "B") if a is not None else ("B", "A")
            problems.append(f"{module}: has lora_{present} but not lora_{missing}")
            continue
        if a[0] != r or len(b) < 2 or b[1] != r:
            problems.append(f"{module}: rank {a[0]} (A {list(a)}, B {list(b)}), but the config says r={r}")
        out = b[0]
        magnitude = parts.get("magnitude")
        if config.use_dora and magnitude is None:
            problems.append(f"{module}: use_dora is set but lora_magnitude_vector is missing")
        if magnitude is not None and (not config.use_dora or not _per_channel(magnitude, out)):
            problems.append(
                f"{module}: unexpected lora_magnitude_vector of shape {list(magnitude)} (use_dora={config.use_dora}, out={out})"
            )
        bias = parts.get("bias")
        if config.lora_bias and bias is None:
            problems.append(f"{module}: lora_bias is set but lora_B.bias is missing")
        if bias is not None and (not config.lora_bias or bias != (out,)):
            problems.append(
                f"{module}: unexpected lora_B.bias of shape {list(bias)} (lora_bias={config.lora_bias}, out={out})"
            )
    return problems
