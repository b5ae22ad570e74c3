"""``--item-init transitions``: the item table starts from the graph of items users had one after another."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.training.test_train import _cfg
from towers.checkpoint import load_checkpoint
from training.item_init import init_from_transitions, spectral_rows, transition_pairs
from training.train import run


def _rows(ids: np.ndarray) -> np.ndarray:  # item id i -> table row i (ids 1..N), 0 for unknown
    ids = np.asarray(ids, dtype=np.int64)
    return np.where(ids < 1000, ids, 0)


def test_pairs_follow_each_users_time_order_and_never_cross_users() -> None:
    train = pd.DataFrame({"user_id": ["a", "b", "a", "a", "b", "b"],
                          "item_id": [3, 7, 1, 5000, 8, 9],  # 5000: not in the table
                          "timestamp": [30, 1, 10, 20, 2, 2]})  # b's last two tie: input order breaks it
    src, dst = transition_pairs(train, _rows)
    # a: 1 (t10) -> 5000 (t20) -> 3 (t30): both pairs touch the unknown item, none kept; b: 7 -> 8 -> 9
    assert sorted(zip(src.tolist(), dst.tolist(), strict=True)) == [(7, 8), (8, 9)]


def test_items_taken_one_after_another_start_close() -> None:
    # 4 chains of 25 items; users walk a few steps along one chain, as series or accessories are taken
    rng = np.random.default_rng(0)
    n_chains, length = 4, 25
    rows = []
    for u in range(400):
        c, pos = rng.integers(n_chains), rng.integers(length)
        for t in range(6):
            rows.append((f"u{u}", 1 + c * length + pos, t))
            pos = int(np.clip(pos + rng.choice([-1, 1]), 0, length - 1))
    train = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    n = 1 + n_chains * length
    emb = spectral_rows(*transition_pairs(train, _rows), n, 16)
    assert torch.all(emb[0] == 0)
    cos = emb[1:] @ emb[1:].T
    chain = np.arange(n - 1) // length
    pos = np.arange(n - 1) % length
    same = chain[:, None] == chain[None, :]
    near = same & (np.abs(pos[:, None] - pos[None, :]) == 1)
    far = same & (np.abs(pos[:, None] - pos[None, :]) >= 10)
    other = ~same
    c = cos.numpy()
    # neighbours in a chain start close (0.91 when written), items far apart in it or in other chains
    # do not (~0)
    assert c[near].mean() > c[far].mean() + 0.5
    assert c[near].mean() > c[other].mean() + 0.5


def test_the_table_keeps_its_scale_padding_and_untouched_rows() -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 4) * 0.05)
    with torch.no_grad():
        w[0].zero_()
    before = w.detach().clone()
    train = pd.DataFrame({"user_id": ["a", "a", "a"], "item_id": [1, 2, 3], "timestamp": [1, 2, 3]})
    assert init_from_transitions(w, train, _rows) == 2
    assert torch.all(w[0] == 0)
    assert torch.equal(w[4:], before[4:])  # items 4, 5 had no transition: their random rows stay
    assert not torch.allclose(w[1:4], before[1:4])
    assert w[1:4].detach().norm(dim=1).tolist() == pytest.approx([float(before[1:].norm(dim=1).mean())] * 3, rel=1e-5)


def test_training_starts_from_the_transitions_and_streamed_data_is_refused(tmp_path: Path) -> None:
    res = run(_cfg(tmp_path, epochs=1, item_init="transitions"))
    m = load_checkpoint(res.dir / "model.pt")
    assert m.config is not None and res.metrics["test"]["masked"]["HR@50"] > 0
    # the same run from random rows ends elsewhere: the option reached the table
    other = load_checkpoint(run(_cfg(tmp_path / "r", epochs=1)).dir / "model.pt")
    assert not torch.allclose(m.item_tower.id_emb.weight, other.item_tower.id_emb.weight)
    parts = tmp_path / "parts"
    from training.synthetic import write_synthetic_parts

    write_synthetic_parts(parts, seed=0, n_users=200, n_items=100, n_clusters=4, interactions_per_user=5)
    with pytest.raises(ValueError, match="item_init=transitions needs the interactions in memory"):
        run(_cfg(tmp_path / "s", data=f"csv:{parts}", data_options={}, epochs=1, item_init="transitions"))
