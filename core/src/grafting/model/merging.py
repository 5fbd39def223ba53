"""Merging: every adapted layer of a model brought to a merged set, all layers or none.

``AdapterModel``'s merge, unmerge, activation and deletion call these; a layer's own
merge order (sites, LIFO) is :class:`~grafting.model.layer.AdaptedLayer`'s.
"""

from __future__ import annotations

from grafting.model.layer import AdaptedLayer


def unmerge_for(layer: AdaptedLayer, names: list[str]) -> bool:
    """Whether activating ``names`` must unmerge ``layer``: a merged adapter leaves the active set, or an
    adapter that reads the layer's own weight (DoRA) would run unmerged beside merged ones."""
    if set(layer.merged) - set(names):
        return True
    return bool(layer.merged) and any(
        n in layer.adapters and n not in layer.merged and getattr(layer.adapters[n], "reads_base_weight", False)
        for n in names
    )


def merge_layers(layers: dict[str, AdaptedLayer], names: list[str], *, safe_merge: bool) -> None:
    """Merge ``names`` into every layer of ``layers`` ({path: layer}), all layers or none.

    Every layer is asked first (:meth:`AdaptedLayer.check_merge`), so a refusal leaves all weights
    as they were; should a layer still fail, the layers already merged are brought back.
    """
    for path, layer in layers.items():  # refuse before any layer's weights change
        layer.check_unchanged(path)
        layer.check_merge(names, safe=safe_merge, layer_name=path)
    done: list[tuple[str, AdaptedLayer, list[str]]] = []
    try:
        for path, layer in layers.items():
            before = list(layer.merged)
            layer.merge(names, safe=safe_merge, layer_name=path)
            done.append((path, layer, before))
    except BaseException:
        for path, layer, before in reversed(done):
            layer.rebuild(set(before), safe=False, layer_name=path)
        raise
    for layer in layers.values():  # once every layer is merged: tied layers share a weight
        layer.record_merged()


def rebuild_layers(
    layers: dict[str, AdaptedLayer], targets: dict[str, set[str]], *, without: str | None = None
) -> None:
    """Bring each layer at ``path`` to the merged set ``targets[path]``, every layer or none.

    Every change is checked first (:meth:`AdaptedLayer.check_rebuild`, on a copy of the layer where
    weights would come out), so a refusal leaves all weights as they were. Should a layer still fail,
    the layers already changed are brought back.
    """
    changes = [(path, layers[path], target) for path, target in targets.items() if target != set(layers[path].merged)]
    for path, layer, target in changes:
        layer.check_unchanged(path)
        layer.check_rebuild(target, layer_name=path, without=without)
    done: list[tuple[str, AdaptedLayer, list[str], tuple[str, ...]]] = []
    try:
        for path, layer, target in changes:
            before, active = list(layer.merged), layer.active
            if without is not None:
                layer.active = tuple(n for n in layer.active if n != without)
            done.append((path, layer, before, active))
            layer.rebuild(target, safe=False, layer_name=path)
    except BaseException:
        for path, layer, before, active in reversed(done):
            layer.rebuild(set(before), safe=False, layer_name=path)
            layer.active = active
        raise
    for layer in layers.values():
        layer.record_merged()
