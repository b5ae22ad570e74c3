"""Turning a published bundle directory into the ``ServingBundle`` the pipeline uses.

``index.bundle`` owns the on-disk format (manifest, checksums, FAISS file, id map, user tables) and
its validation; this module adapts a ``LoadedBundle`` into the few lookups a request needs (plain
dicts and numpy arrays, so the hot path never touches pandas).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from service.pipeline import ItemId, ServingBundle
from towers.features import PAD


def from_loaded(lb: Any) -> ServingBundle:
    """Adapt an ``index.bundle.LoadedBundle``."""
    id_map = lb.id_map
    pop_fids = np.asarray([id_map.faiss_id_of(p) for p in lb.popular], dtype=np.int64)
    # popular.json carries an order, not counts: score by rank, 1.0 for the most popular
    pop_scores = (1.0 - np.arange(len(pop_fids), dtype=np.float32) / max(1, len(pop_fids))).astype(np.float32)
    profiles: dict[str, dict[str, Any]] = lb.user_features
    histories: dict[str, list[ItemId]] = lb.histories
    seen: dict[str, frozenset[ItemId]] = lb.seen
    encoder = lb.model.encoder  # its compact id index answers 'known?' without a set of every id
    empty: list[ItemId] = []
    no_items: frozenset[ItemId] = frozenset()

    def known(uid: str) -> bool:
        return uid in profiles or uid in histories or encoder.user_row(uid) != PAD

    def similar(item_id: ItemId, k: int) -> tuple[np.ndarray, list[ItemId]]:
        items, scores = lb.similar_items(item_id, k)
        return np.asarray(scores, dtype=np.float32), items

    return ServingBundle(
        model_version=lb.manifest.model_version, index_version=lb.manifest.index_version, path=Path(lb.path),
        model=lb.model, searcher=lb.searcher, id_map=id_map, popular=pop_fids, popular_scores=pop_scores,
        user_profile=profiles.get,
        user_history=lambda uid: histories.get(uid, empty),
        user_seen=lambda uid: seen.get(uid, no_items),
        similar=similar, known_user=known, n_items=len(id_map),
        extra={"recipe": lb.manifest.recipe, "recall": lb.manifest.recall},
        neighbours=lb.neighbours, neighbour_weight=lb.manifest.neighbour_weight if lb.neighbours is not None else 0.0,
        item_vectors=lb.item_vectors,
    )


def load_serving_bundle(path: Path) -> ServingBundle:
    """Validate and load a bundle directory; raises on anything wrong (it is then never served)."""
    from index.bundle import load_bundle

    return from_loaded(load_bundle(path))


def current_pointer(artifacts: Path) -> Path | None:
    """The directory bundles/CURRENT names, None when nothing is published yet."""
    from index.bundle import current_bundle_dir

    return current_bundle_dir(artifacts)


def bundle_dir(artifacts: Path, index_version: str) -> Path:
    """bundles/<index_version>; ValueError when the version is not one directory name."""
    from towers.artifacts import bundle_dir as version_bundle_dir

    return version_bundle_dir(artifacts, index_version)


def notice_channel(prefix: str) -> str:
    """The pub/sub channel the reindex job announces new bundles on."""
    from index.bundle import channel

    return channel(prefix)
