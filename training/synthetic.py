"""The synthetic data generator, ``make_synthetic``, as a list of stages.

Each stage is a function of a shared ``numpy.random.Generator`` and the outputs of the stages
before it; ``make_synthetic`` calls them in order on one generator, so the same seed and options
give the same data, bit for bit. The user-side stages (``synthetic_users``,
``synthetic_interactions``, ``synthetic_timestamps``) take the users they work on as arrays, so a
generator for many users can call them one chunk of users at a time (with a generator per chunk).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from towers.schema import DataError, FeatureSpec
from training.data import RecData

log = logging.getLogger(__name__)

USER_FEATURES = [FeatureSpec("segment", "categorical"), FeatureSpec("age", "numeric")]
ITEM_FEATURES = [FeatureSpec("category", "categorical"), FeatureSpec("tags", "multi"),
                 FeatureSpec("price", "numeric")]
TAGS_PER_CLUSTER = 4
T0 = 1_600_000_000  # the earliest start of a user's timeline (unix seconds)


@dataclass
class ItemClusters:
    """Items grouped by cluster, with Zipf-like popularity inside each cluster, and a sampler."""

    item_cluster: np.ndarray  # (N,) cluster of each item position
    by_cluster: np.ndarray    # (N,) item positions ordered by (cluster, popularity rank)
    cdf: np.ndarray           # (N,) cumulative weights; cluster c spans (c, c + 1]
    seg_end: np.ndarray       # (C,) last index into by_cluster of each cluster

    @property
    def n_clusters(self) -> int:
        return len(self.seg_end)

    def draw(self, rng: np.random.Generator, clusters: np.ndarray) -> np.ndarray:
        """One item position (0..N-1) per entry of ``clusters``, popularity-weighted inside it:
        one searchsorted samples every (cluster, uniform) pair at once."""
        pos = np.searchsorted(self.cdf, clusters + rng.random(len(clusters)), side="right")
        return self.by_cluster[np.minimum(pos, self.seg_end[clusters])]


@dataclass
class UserClusters:
    """Each user's primary cluster and, half of the time, a secondary one (else the primary)."""

    primary: np.ndarray     # (U,)
    second: np.ndarray      # (U,)
    has_second: np.ndarray  # (U,) bool


def check_options(n_users: int, n_items: int, n_clusters: int, interactions_per_user: int, noise: float) -> None:
    if n_users < 1 or n_items < 2 or n_clusters < 1 or n_clusters > n_items or interactions_per_user < 1:
        raise DataError(f"synthetic data needs n_users >= 1, n_items >= 2, 1 <= n_clusters <= n_items and "
                        f"interactions_per_user >= 1 (got n_users={n_users}, n_items={n_items}, "
                        f"n_clusters={n_clusters}, interactions_per_user={interactions_per_user})")
    if not 0.0 <= noise < 1.0:
        raise DataError(f"synthetic noise must be in [0, 1) (got {noise})")


def item_clusters(rng: np.random.Generator, n_items: int, n_clusters: int, zipf_a: float) -> ItemClusters:
    """Balanced clusters, a random popularity rank inside each, weight ``1 / rank**zipf_a``."""
    item_cluster = rng.permutation(np.arange(n_items) % n_clusters)
    # group items by cluster, random order inside a cluster = popularity rank
    by_cluster = np.lexsort((rng.random(n_items), item_cluster))
    sorted_cluster = item_cluster[by_cluster]
    counts = np.bincount(item_cluster, minlength=n_clusters)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(n_items) - starts[sorted_cluster]
    weight = 1.0 / (rank + 1.0) ** zipf_a
    csum = np.cumsum(weight)
    seg_before = np.concatenate([[0.0], csum])[starts][sorted_cluster]
    seg_total = (csum[starts + counts - 1])[sorted_cluster] - seg_before
    cdf = sorted_cluster + (csum - seg_before) / seg_total
    cdf[starts + counts - 1] = np.arange(n_clusters) + 1.0  # exact segment ends, no float drift
    return ItemClusters(item_cluster=item_cluster, by_cluster=by_cluster, cdf=cdf, seg_end=starts + counts - 1)


def item_features(rng: np.random.Generator, clusters: ItemClusters, item_ids: np.ndarray) -> pd.DataFrame:
    """One category (two per cluster, 10 % in a random one), 1-3 tags (mostly the cluster's) and a
    price whose level depends on the cluster; indexed by ``item_ids``."""
    item_cluster, n_clusters = clusters.item_cluster, clusters.n_clusters
    n_items = len(item_cluster)
    n_categories = 2 * n_clusters
    category = 2 * item_cluster + rng.integers(0, 2, n_items)
    off = rng.random(n_items) < 0.10
    category[off] = rng.integers(0, n_categories, int(off.sum()))
    n_tags = TAGS_PER_CLUSTER * n_clusters
    n_item_tags = rng.integers(1, 4, n_items)
    tag_own = rng.random((n_items, 3)) < 0.8
    tag_pick = np.where(tag_own,
                        item_cluster[:, None] * TAGS_PER_CLUSTER + rng.integers(0, TAGS_PER_CLUSTER, (n_items, 3)),
                        rng.integers(0, n_tags, (n_items, 3)))
    tags = [tuple(sorted({f"t{t:03d}" for t in tag_pick[i, : n_item_tags[i]]})) for i in range(n_items)]
    price_level = np.exp(rng.normal(2.5, 0.6, n_clusters))
    price = np.round(price_level[item_cluster] * np.exp(rng.normal(0.0, 0.3, n_items)), 2)
    items = pd.DataFrame({
        "category": pd.Series([f"cat{c:02d}" for c in category], dtype=object),
        "tags": pd.Series(tags, dtype=object),
        "price": price.astype(np.float64),
    })
    items.index = pd.Index(item_ids, name="item_id")
    return items


def synthetic_users(rng: np.random.Generator, user_ids: np.ndarray, n_clusters: int
                    ) -> tuple[pd.DataFrame, UserClusters]:
    """Clusters of each user in ``user_ids`` and the features that carry them: "segment" names the
    primary cluster 80 % of the time, "age" shifts with it."""
    n_users = len(user_ids)
    primary = rng.integers(0, n_clusters, n_users)
    has_second = (rng.random(n_users) < 0.5) & (n_clusters > 1)
    second = (primary + rng.integers(1, max(n_clusters, 2), n_users)) % n_clusters
    second = np.where(has_second, second, primary)
    segment = np.where(rng.random(n_users) < 0.8, primary, rng.integers(0, n_clusters, n_users))
    age = np.clip(np.round(rng.normal(22.0 + 5.0 * (primary % 8), 6.0)), 16, 80)
    users = pd.DataFrame({
        "segment": pd.Series([f"seg{s:02d}" for s in segment], dtype=object),
        "age": age.astype(np.float64),
    })
    users.index = pd.Index(user_ids, dtype=object, name="user_id")
    return users, UserClusters(primary=primary, second=second, has_second=has_second)


def synthetic_interactions(rng: np.random.Generator, items: ItemClusters, users: UserClusters,
                           interactions_per_user: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """(user position, item position) pairs, grouped by user, no pair twice.

    A per-user target count (log-normal around the mean), then rounds of draws with replacement
    (30 % from the secondary cluster, a ``noise`` share uniform over the catalogue), keeping the
    first occurrence of each (user, item) until the target is met."""
    n_users, n_items = len(users.primary), len(items.item_cluster)
    sigma = 0.5
    target = np.round(interactions_per_user * np.exp(rng.normal(-sigma * sigma / 2, sigma, n_users)))
    cap = max(2, min(10 * interactions_per_user, n_items // 2))
    target = np.clip(target, min(2, cap), cap).astype(np.int64)
    got = np.zeros(n_users, dtype=np.int64)
    kept_users: list[np.ndarray] = []
    kept_items: list[np.ndarray] = []
    seen_keys = np.empty(0, dtype=np.int64)
    for _ in range(6):
        short = target - got
        need = np.flatnonzero(short > 0)
        if len(need) == 0:
            break
        n_draw = 2 * short[need] + 3
        u = np.repeat(need, n_draw)
        from_second = rng.random(len(u)) < 0.3
        clusters = np.where(from_second, users.second[u], users.primary[u])
        drawn = items.draw(rng, clusters)
        is_noise = rng.random(len(u)) < noise
        drawn[is_noise] = rng.integers(0, n_items, int(is_noise.sum()))
        keys = u.astype(np.int64) * n_items + drawn
        # first occurrence of each new (user, item), in draw order
        _, first = np.unique(keys, return_index=True)
        first.sort()
        fresh = first[~np.isin(keys[first], seen_keys)]
        u, drawn = u[fresh], drawn[fresh]
        # keep at most the shortfall per user (draws are grouped by user, in order)
        grp_start = np.searchsorted(u, u, side="left")
        keep = (np.arange(len(u)) - grp_start) < short[u]
        u, drawn = u[keep], drawn[keep]
        kept_users.append(u)
        kept_items.append(drawn)
        seen_keys = np.concatenate([seen_keys, u.astype(np.int64) * n_items + drawn])
        got += np.bincount(u, minlength=n_users)
    all_u = np.concatenate(kept_users)
    all_i = np.concatenate(kept_items)
    order = np.argsort(all_u, kind="stable")
    return all_u[order], all_i[order]


def synthetic_timestamps(rng: np.random.Generator, user_pos: np.ndarray, n_users: int) -> np.ndarray:
    """Strictly increasing timestamps per user (``user_pos`` grouped by user): a start time within
    180 days of T0 plus cumulative positive gaps (mean 6 h)."""
    start = T0 + rng.integers(0, 180 * 86_400, n_users)
    gaps = 1 + rng.exponential(6 * 3600.0, len(user_pos)).astype(np.int64)
    csum_gap = np.cumsum(gaps)
    first_of_user = np.searchsorted(user_pos, user_pos, side="left")
    before = np.where(first_of_user > 0, csum_gap[np.maximum(first_of_user - 1, 0)], 0)
    return (start[user_pos] + (csum_gap - before)).astype(np.int64)


def interaction_log(user_ids: np.ndarray, item_ids: np.ndarray, user_pos: np.ndarray, item_pos: np.ndarray,
                    ts: np.ndarray) -> pd.DataFrame:
    """The interaction table, ordered by time (stable, so ties keep the per-user order)."""
    inter = pd.DataFrame({
        "user_id": pd.Series(user_ids[user_pos], dtype=object),
        "item_id": item_ids[item_pos],
        "timestamp": ts,
        "weight": np.ones(len(user_pos), dtype=np.float64),
    })
    return inter.sort_values("timestamp", kind="stable").reset_index(drop=True)


def ground_truth(user_ids: np.ndarray, users: UserClusters, item_ids: np.ndarray,
                 items: ItemClusters) -> dict[str, dict[Any, Any]]:
    """RecData.truth: the clusters the data was drawn from, for tests of what a model learned."""
    return {
        "user_cluster": {uid: int(c) for uid, c in zip(user_ids, users.primary, strict=True)},
        "user_clusters": {uid: ([int(p), int(s)] if h else [int(p)])
                          for uid, p, s, h in zip(user_ids, users.primary, users.second, users.has_second,
                                                  strict=True)},
        "item_cluster": {int(i): int(c) for i, c in zip(item_ids, items.item_cluster, strict=True)},
    }


def make_synthetic(*, seed: int = 0, n_users: int = 2000, n_items: int = 1000, n_clusters: int = 8,
                   interactions_per_user: int = 30, noise: float = 0.05, zipf_a: float = 1.0) -> RecData:
    """Seeded users/items/interactions with latent interest clusters and power-law popularity.

    - every item belongs to one cluster (balanced sizes) and one category (two per cluster, 10 %
      of items in a random category), has 1-3 tags (mostly its cluster's) and a price whose level
      depends on the cluster;
    - every user has a primary cluster and, half of the time, a secondary one (70/30 split); the
      "segment" feature names the primary cluster 80 % of the time, "age" shifts with it;
    - a user's items are drawn, without repeats, from the user's clusters with Zipf-like weights
      ``1 / rank**zipf_a`` inside each cluster, plus a ``noise`` share uniform over the catalogue;
    - timestamps increase strictly per user (users start at different times).
    The same seed and options give the same data, bit for bit.
    """
    check_options(n_users, n_items, n_clusters, interactions_per_user, noise)
    rng = np.random.default_rng(seed)
    item_ids = np.arange(1, n_items + 1, dtype=np.int64)
    user_ids = np.array([str(u) for u in range(1, n_users + 1)], dtype=object)

    clusters = item_clusters(rng, n_items, n_clusters, zipf_a)
    items = item_features(rng, clusters, item_ids)
    users, user_clusters = synthetic_users(rng, user_ids, n_clusters)
    user_pos, item_pos = synthetic_interactions(rng, clusters, user_clusters, interactions_per_user, noise)
    ts = synthetic_timestamps(rng, user_pos, n_users)
    inter = interaction_log(user_ids, item_ids, user_pos, item_pos, ts)

    log.info("synthetic data (seed %d): %d users, %d items, %d clusters, %d interactions",
             seed, n_users, n_items, n_clusters, len(inter))
    return RecData(name="synthetic", interactions=inter, users=users, items=items,
                   user_features=list(USER_FEATURES), item_features=list(ITEM_FEATURES),
                   truth=ground_truth(user_ids, user_clusters, item_ids, clusters))


def write_synthetic_parts(dest: str | Path, *, seed: int = 0, n_users: int = 2000, n_items: int = 1000,
                          n_clusters: int = 8, interactions_per_user: int = 30, noise: float = 0.05,
                          zipf_a: float = 1.0, chunk_users: int = 250_000) -> dict[str, int]:
    """The same kind of data as ``make_synthetic``, written for streamed training (``csv:DEST``):
    ``items.parquet``, ``users.parquet`` and ``interactions/part-NNNNN.parquet``, one part per chunk
    of ``chunk_users`` users.

    The catalogue is drawn once; each chunk of users gets its own generator (seeded by (seed, chunk)),
    so memory is one chunk's interactions whatever the number of users, and the same options give
    the same files. (Not the same rows as ``make_synthetic`` with that seed: its one generator runs
    through all users at once.)
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    check_options(n_users, n_items, n_clusters, interactions_per_user, noise)
    if chunk_users < 1:
        raise DataError(f"chunk_users must be >= 1 (got {chunk_users})")
    dest = Path(dest)
    (dest / "interactions").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    item_ids = np.arange(1, n_items + 1, dtype=np.int64)
    clusters = item_clusters(rng, n_items, n_clusters, zipf_a)
    items = item_features(rng, clusters, item_ids)
    items["tags"] = items["tags"].map(list)  # a Parquet list column: read back as a multi-valued feature
    items.to_parquet(dest / "items.parquet")
    del items
    rows = 0
    users_schema = pa.schema([("user_id", pa.string()), ("segment", pa.string()), ("age", pa.float64())])
    with pq.ParquetWriter(dest / "users.parquet", users_schema) as users_out:
        for k, start in enumerate(range(0, n_users, chunk_users)):
            crng = np.random.default_rng([seed, k + 1])
            user_ids = np.array([str(u) for u in range(start + 1, min(n_users, start + chunk_users) + 1)], dtype=object)
            users, user_clusters = synthetic_users(crng, user_ids, n_clusters)
            users_out.write_table(pa.Table.from_pandas(users.reset_index(), schema=users_schema, preserve_index=False))
            user_pos, item_pos = synthetic_interactions(crng, clusters, user_clusters, interactions_per_user, noise)
            ts = synthetic_timestamps(crng, user_pos, len(user_ids))
            inter = interaction_log(user_ids, item_ids, user_pos, item_pos, ts)
            inter.to_parquet(dest / "interactions" / f"part-{k:05d}.parquet", index=False)
            rows += len(inter)
            log.info("synthetic part %d: users %d-%d, %d interactions", k, start + 1, start + len(user_ids), len(inter))
    return {"users": n_users, "items": n_items, "interactions": rows}
