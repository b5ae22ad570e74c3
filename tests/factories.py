"""Small synthetic worlds for tests: users, items, interactions, an (untrained) two-tower model and,
once the index package can publish, a real bundle on disk.

An untrained model is enough for the service's tests: they check what a user of the API notices
(ids, versions, exclusions, caching, events changing the answer), not ranking quality.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from towers.schema import FeatureSpec


@dataclass
class World:
    users: pd.DataFrame
    items: pd.DataFrame
    interactions: pd.DataFrame
    user_features: list[FeatureSpec]
    item_features: list[FeatureSpec]


def make_world(n_users: int = 40, n_items: int = 120, per_user: int = 8, seed: int = 0,
               str_item_ids: bool = False) -> World:
    rng = np.random.default_rng(seed)
    item_ids: list[Any] = [f"sku-{i}" for i in range(n_items)] if str_item_ids else list(range(1, n_items + 1))
    genres = ["action", "comedy", "drama", "horror", "scifi"]
    items = pd.DataFrame({
        "genre": [genres[i % len(genres)] for i in range(n_items)],
        "tags": [(genres[i % 5], genres[(i * 7) % 5]) for i in range(n_items)],
        "year": rng.integers(1970, 2020, n_items).astype("float64"),
    }, index=pd.Index(item_ids, name="item_id"))
    user_ids = [str(u) for u in range(1, n_users + 1)]
    users = pd.DataFrame({
        "age": rng.integers(18, 70, n_users).astype("float64"),
        "country": [["de", "fr", "us"][u % 3] for u in range(n_users)],
    }, index=pd.Index(user_ids, name="user_id"))
    rows = []
    for u in user_ids:
        picks = rng.choice(n_items, size=per_user, replace=False)
        for t, p in enumerate(picks):
            rows.append((u, item_ids[p], 1_600_000_000 + t * 60, 1.0))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "weight"])
    inter["timestamp"] = inter["timestamp"].astype("int64")
    if not str_item_ids:
        inter["item_id"] = inter["item_id"].astype("int64")
    return World(users=users, items=items, interactions=inter,
                 user_features=[FeatureSpec("age", "numeric"), FeatureSpec("country", "categorical")],
                 item_features=[FeatureSpec("genre", "categorical"), FeatureSpec("tags", "multi"),
                                FeatureSpec("year", "numeric")])


def make_model(world: World, dim: int = 16, seed: int = 0, model: str = "youtubednn", **tower: Any) -> Any:
    """An untrained model; ``tower``: more TowerConfig settings (``history_encoder="attention",
    interests=3`` for a multi-interest user tower)."""
    import torch

    from towers.checkpoint import TwoTowerModel
    from towers.features import FeatureEncoder
    from towers.model import TowerConfig

    torch.manual_seed(seed)
    enc = FeatureEncoder.fit(world.users, world.items, world.user_features, world.item_features, history_len=10)
    cfg = TowerConfig(model=model, dim=dim, emb_dim=16, feature_dim=8, hidden=(32,), **tower)
    m = TwoTowerModel.create(cfg, enc, meta={"model_version": "test"})
    # random init gives near-identical vectors for every user; a larger history embedding spread
    # makes a user's history visibly move their vector, like a trained model's would
    with torch.no_grad():
        for p in m.user_tower.parameters():  # type: ignore[union-attr]
            p.mul_(8.0)
        for p in m.item_tower.parameters():  # type: ignore[union-attr]
            p.mul_(8.0)
    return m.eval()


def histories_of(interactions: pd.DataFrame) -> dict[str, list[Any]]:
    """user id -> every item interacted with, oldest first."""
    df = interactions.sort_values(["user_id", "timestamp"], kind="stable")
    return {str(u): list(g["item_id"]) for u, g in df.groupby("user_id", sort=False)}


def publish_bundle(artifacts: Path, world: World | None = None, model: Any = None, *, seed: int = 0,
                   index_version: str | None = None, model_version: str = "20250101T000000Z-aaaaaa",
                   recipe: str = "Flat", redis_url: str | None = None, prefix: str = "tt",
                   neighbour_weight: float = 0.0) -> Path:
    """Write and publish a real bundle (index.bundle format) under ``artifacts``; returns its dir.
    ``neighbour_weight`` > 0: recall blends in the last item's neighbours, counted as reindex does."""
    from index.bundle import publish, staging_dir, write_bundle
    from index.reindex import item_neighbours
    from index.searcher import FaissSearcher, IdMap
    from towers.artifacts import new_version
    from towers.checkpoint import save_checkpoint

    world = world or make_world(seed=seed)
    model = model or make_model(world, seed=seed)
    index_version = index_version or new_version()
    vecs = model.embed_items(world.items)  # (N, D)
    id_map = IdMap(list(world.items.index))
    searcher = FaissSearcher.build(vecs, id_map.faiss_ids, recipe)
    hist = histories_of(world.interactions)
    counts = world.interactions["item_id"].value_counts()
    popular = list(counts.index) + [i for i in world.items.index if i not in counts.index]
    ckpt = Path(artifacts) / "models" / model_version / "model.pt"
    if not ckpt.exists():
        save_checkpoint(ckpt, model)
    staged = staging_dir(artifacts, index_version)
    write_bundle(staged, index_version=index_version, model_version=model_version, model_path=ckpt,
                 searcher=searcher, id_map=id_map, item_vectors=vecs, popular=popular, users=world.users,
                 histories={u: h[-model.encoder.history_len:] for u, h in hist.items()}, seen=hist,
                 recall=1.0, recall_k=10, n_eval_users=0, history_len=model.encoder.history_len,
                 neighbour_weight=neighbour_weight,
                 neighbours=item_neighbours(world.interactions, world.items.index) if neighbour_weight else None)
    return publish(artifacts, staged, redis_url=redis_url, prefix=prefix)


def truncate(p: Path) -> None:
    """Cut a file in half: what a crash mid-copy or a full disk leaves behind."""
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def flip_byte(p: Path) -> None:
    """Flip one byte in the middle: same size, different content (only a checksum notices)."""
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
