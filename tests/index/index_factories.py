"""Small synthetic factories for index tests: clustered vectors, a tiny catalogue, a tiny trained
two-tower model, and the ``models/<v>/`` artifacts layout the training job writes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from towers.artifacts import LATEST, write_pointer
from towers.checkpoint import TwoTowerModel, save_checkpoint
from towers.features import FeatureEncoder
from towers.model import TowerConfig
from towers.schema import FeatureSpec
from training.optim import build_optimizers

GENRES = ["action", "comedy", "drama", "horror", "scifi"]


def clustered(n: int, dim: int, n_clusters: int = 50, noise: float = 0.35, seed: int = 0) -> np.ndarray:
    """L2-normalised vectors around random centres: the shape tower outputs have (topics, genres)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    assign = rng.integers(0, n_clusters, n)
    x = centres[assign] + noise * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


@dataclass
class Catalogue:
    users: pd.DataFrame  # index user_id (str)
    items: pd.DataFrame  # index item_id
    interactions: pd.DataFrame  # user_id, item_id, timestamp, weight
    user_features: list[FeatureSpec]
    item_features: list[FeatureSpec]


def tiny_catalogue(n_items: int = 100, n_users: int = 60, per_user: int = 12, seed: int = 0,
                   str_ids: bool = False) -> Catalogue:
    """Users each like one genre and interact (mostly) with items of it, so a trained model puts
    items of a genre together and content features predict the neighbourhood of a new item."""
    rng = np.random.default_rng(seed)
    genre_of = np.arange(n_items) % len(GENRES)
    ids = [f"m{i:04d}" for i in range(n_items)] if str_ids else list(range(1, n_items + 1))
    items = pd.DataFrame({
        "genre": [GENRES[g] for g in genre_of],
        "tags": [(GENRES[g] + "-tag", "colour" if i % 2 else "bw") for i, g in enumerate(genre_of)],
        "year": rng.integers(1960, 2020, n_items).astype("float64"),
    }, index=pd.Index(ids, name="item_id"))
    user_ids = [str(u) for u in range(1, n_users + 1)]
    fav = rng.integers(0, len(GENRES), n_users)
    users = pd.DataFrame({"age": [["young", "mid", "old"][f % 3] for f in fav]},
                         index=pd.Index(user_ids, name="user_id"))
    rows = []
    for u, g in zip(user_ids, fav, strict=True):
        pool = np.flatnonzero(genre_of == g)
        picks = rng.choice(pool, size=min(per_user, len(pool)), replace=False)
        for t, p in enumerate(picks):
            rows.append((u, ids[p], 1_000_000 + t * 60, 1.0))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "weight"])
    inter["timestamp"] = inter["timestamp"].astype("int64")
    if not str_ids:
        inter["item_id"] = inter["item_id"].astype("int64")
    return Catalogue(users, items, inter, [FeatureSpec("age", "categorical")],
                     [FeatureSpec("genre", "categorical"), FeatureSpec("tags", "multi"),
                      FeatureSpec("year", "numeric")])


def tiny_model(cat: Catalogue, dim: int = 16, steps: int = 60, seed: int = 0,
               model: str = "youtubednn") -> TwoTowerModel:
    """A real two-tower model trained for a few dozen in-batch-softmax steps (about a second)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds waiting on a busy machine
    try:
        return _train_tiny(cat, dim, steps, seed, model)
    finally:
        torch.set_num_threads(threads)


def _train_tiny(cat: Catalogue, dim: int, steps: int, seed: int, model: str) -> TwoTowerModel:
    torch.manual_seed(seed)
    enc = FeatureEncoder.fit(cat.users, cat.items, cat.user_features, cat.item_features, history_len=5)
    cfg = TowerConfig(model=model, dim=dim, emb_dim=16, feature_dim=8, hidden=(32,), temperature=0.1)
    m = TwoTowerModel.create(cfg, enc)
    assert m.user_tower is not None and m.item_tower is not None
    # every parameter dense under one Adam(W) (the tables' training-job optimiser is not the point here)
    opt = build_optimizers([m.user_tower, m.item_tower], kind="adamw", lr=0.02, table_lr=0.02, weight_decay=0.0)
    inter = cat.interactions.sort_values(["user_id", "timestamp"])
    hist = inter.groupby("user_id", sort=False)["item_id"].apply(list).to_dict()
    users = list(inter["user_id"])
    items = list(inter["item_id"])
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.choice(len(users), size=min(128, len(users)), replace=False)
        ub = [users[i] for i in idx]
        u = m.user_tower(enc.encode_users(ub, cat.users.reindex(ub), [hist[x] for x in ub]))  # (B, D)
        v = m.item_tower(enc.encode_items(cat.items.loc[[items[i] for i in idx]]))  # (B, D)
        logits = u @ v.T / cfg.temperature  # (B, B)
        loss = F.cross_entropy(logits, torch.arange(len(idx)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def write_model_artifacts(artifacts: Path, cat: Catalogue, model: TwoTowerModel,
                          version: str = "20240101T000000Z-aaaaaa", latest: bool = True) -> Path:
    """Write ``models/<version>/`` as the training job does; returns that directory."""
    d = Path(artifacts) / "models" / version
    (d / "data").mkdir(parents=True, exist_ok=True)
    save_checkpoint(d / "model.pt", model, {"model_version": version})
    cat.items.to_parquet(d / "data" / "items.parquet")
    cat.users.to_parquet(d / "data" / "users.parquet")
    cat.interactions.to_parquet(d / "data" / "interactions.parquet", index=False)
    if latest:
        write_pointer(Path(artifacts) / "models" / LATEST, version)
    return d
