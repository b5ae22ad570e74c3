"""Turning a published bundle directory into the ``ServingBundle`` the pipeline uses.

``index.bundle`` owns the on-disk format (manifest, checksums, FAISS file, id map, data tables);
this module only adapts what it loads into fast per-request lookups (dicts keyed by user id) so the
hot path never touches pandas.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from service.pipeline import ItemId, ServingBundle


def _histories(interactions: pd.DataFrame | None) -> dict[str, list[ItemId]]:
    """user id -> every item they interacted with, oldest first (the full log: also the seen set)."""
    if interactions is None or len(interactions) == 0:
        return {}
    df = interactions[["user_id", "item_id", "timestamp"]]
    df = df.sort_values(["user_id", "timestamp"], kind="stable")
    users = df["user_id"].astype(str).to_numpy()
    items = df["item_id"].tolist()
    out: dict[str, list[ItemId]] = {}
    if len(users) == 0:
        return out
    # boundaries of runs of equal user ids in the sorted frame
    cut = np.flatnonzero(users[1:] != users[:-1]) + 1
    starts = np.concatenate([[0], cut])
    ends = np.concatenate([cut, [len(users)]])
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        out[str(users[s])] = items[s:e]
    return out


def _profiles(users: pd.DataFrame | None, feature_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    if users is None or len(users) == 0:
        return {}
    cols = [c for c in feature_names if c in users.columns]
    if not cols:
        return {str(u): {} for u in users.index}
    sub = users[cols]
    return {str(u): dict(zip(cols, vals, strict=True))
            for u, vals in zip(users.index, sub.itertuples(index=False, name=None), strict=True)}


def _popularity(id_map: Any, interactions: pd.DataFrame | None) -> tuple[np.ndarray, np.ndarray]:
    """Every catalogue item as FAISS ids, most interacted-with first (ties: catalogue order)."""
    n = len(id_map)
    counts = np.zeros(n, dtype=np.float64)
    if interactions is not None and len(interactions):
        rows = id_map.rows_of(interactions["item_id"].tolist())
        w = interactions["weight"].to_numpy(dtype=np.float64) if "weight" in interactions else np.ones(len(rows))
        ok = rows >= 0
        np.add.at(counts, rows[ok], w[ok])
    order = np.argsort(-counts, kind="stable")
    total = counts.sum() or 1.0
    return id_map.faiss_ids[order].astype(np.int64), (counts[order] / total).astype(np.float32)


def serving_bundle_from_parts(*, model: Any, searcher: Any, id_map: Any, model_version: str, index_version: str,
                              item_vectors: np.ndarray | None = None, users: pd.DataFrame | None = None,
                              interactions: pd.DataFrame | None = None, path: Path | None = None,
                              popular: tuple[np.ndarray, np.ndarray] | None = None,
                              history_keep: int | None = None) -> ServingBundle:
    histories = _histories(interactions)
    profiles = _profiles(users, [s.name for s in model.encoder.user_features])
    pop_ids, pop_scores = popular if popular is not None else _popularity(id_map, interactions)
    keep = history_keep or max(1, 4 * int(model.encoder.history_len))
    known = set(histories) | set(profiles) | set(model.encoder.user_ids)
    empty: list[ItemId] = []

    def similar(item_id: ItemId, k: int) -> tuple[np.ndarray, list[ItemId]]:
        if item_vectors is None:
            raise LookupError("this bundle has no item vectors")
        row = id_map.row_of(item_id)
        q = np.ascontiguousarray(item_vectors[row: row + 1], dtype=np.float32)  # (1, D)
        scores, fids = searcher.search(q, min(len(id_map), k + 1))
        me = int(id_map.faiss_ids[row])
        keep_mask = (fids[0] >= 0) & (fids[0] != me)
        return scores[0][keep_mask][:k], id_map.to_items(fids[0][keep_mask][:k])

    return ServingBundle(
        model_version=str(model_version), index_version=str(index_version), path=path,
        model=model, searcher=searcher, id_map=id_map,
        popular=np.asarray(pop_ids, dtype=np.int64), popular_scores=np.asarray(pop_scores, dtype=np.float32),
        user_profile=profiles.get,
        user_history=lambda uid: histories.get(uid, empty)[-keep:],
        user_seen=lambda uid: histories.get(uid, empty),
        similar=similar,
        known_user=known.__contains__,
        n_items=len(id_map),
    )


def _get(obj: Any, *names: str) -> Any:
    for n in names:
        if isinstance(obj, Mapping) and n in obj:
            return obj[n]
        if hasattr(obj, n):
            return getattr(obj, n)
    return None


def load_serving_bundle(path: Path) -> ServingBundle:
    """Validate and load a bundle directory (raises on anything wrong: it is then never served)."""
    from index.bundle import load_bundle

    lb = load_bundle(path)
    manifest = _get(lb, "manifest")
    return serving_bundle_from_parts(
        model=lb.model, searcher=lb.searcher, id_map=lb.id_map,
        model_version=_get(manifest, "model_version"), index_version=_get(manifest, "index_version"),
        item_vectors=_get(lb, "item_vectors"), users=_get(lb, "users", "user_features"),
        interactions=_get(lb, "interactions"), path=Path(path),
    )


def current_pointer(bundles_dir: Path) -> Path | None:
    """The directory bundles/CURRENT names, None when nothing is published yet."""
    from index.bundle import current_bundle_dir

    d = current_bundle_dir(bundles_dir)
    return Path(d) if d is not None else None
