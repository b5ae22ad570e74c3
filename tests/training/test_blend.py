"""Blending the last item's neighbours into recall: the weight is chosen on validation, exactly, and
only when the data has an order to learn from; the checkpoint carries it to every evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from training.blend import blended_scorer, choose_weight, neighbours_from
from training.data import RecData, Split
from training.evaluate import build_eval_set, evaluate_scores


def _chains(n_users: int, n_items: int, length: int, seed: int, ordered: bool) -> pd.DataFrame:
    """Each user walks a few steps along the item line (i, i+1, ...) from a random start; with
    ``ordered`` False the same items come in a random order (nothing sequential to learn)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        start = int(rng.integers(0, n_items - length))
        walk = list(range(start, start + length))
        if not ordered:
            walk = rng.permutation(n_items)[:length].tolist()
        rows += [(f"u{u}", i, t) for t, i in enumerate(walk)]
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    return df.assign(item_id=df["item_id"].astype(np.int64), timestamp=df["timestamp"].astype(np.int64), weight=1.0)


def _data_split(inter: pd.DataFrame, n_items: int) -> tuple[RecData, Split]:
    items = pd.DataFrame(index=pd.Index(np.arange(n_items, dtype=np.int64), name="item_id"))
    users = pd.DataFrame(index=pd.Index(sorted(inter["user_id"].unique()), name="user_id"))
    s = inter.sort_values(["user_id", "timestamp"], kind="stable")
    pos = s.groupby("user_id").cumcount(ascending=False)
    return RecData("t", inter, users, items, [], []), Split(train=s[pos >= 2], valid=s[pos == 1], test=s[pos == 0])


def test_choosing_ranks_every_weight_exactly_as_scoring_the_whole_catalogue_does():
    data, split = _data_split(_chains(300, 200, 6, seed=1, ordered=True), 200)
    ev = build_eval_set(data, split, "valid")
    nb = neighbours_from(split.train, ev.item_ids)
    scores = torch.from_numpy(np.random.default_rng(0).normal(size=(ev.n_users, ev.n_items)).astype(np.float32))

    def towers(users: np.ndarray) -> torch.Tensor:
        return scores[torch.from_numpy(users)]

    weights = (0.0, 0.1, 0.5, 2.0, 8.0)
    _, got, _ = choose_weight(towers, ev, nb, k=10, weights=weights, batch=64)  # several batches
    for w in weights:
        full = evaluate_scores(blended_scorer(towers, ev, nb, w), ev, ks=(10,), mask_seen="masked")
        assert got[w] == pytest.approx(full["masked"]["HR@10"]), w
    assert got[8.0] > got[0.0] + 0.3  # the line's next item is the last one's neighbour: the count finds it


def test_a_weight_is_kept_only_when_validation_shows_a_real_gain():
    # random scores on ordered walks: the neighbours find the next item, the towers do not
    data, split = _data_split(_chains(300, 200, 6, seed=2, ordered=True), 200)
    ev = build_eval_set(data, split, "valid")
    scores = torch.from_numpy(np.random.default_rng(0).normal(size=(ev.n_users, ev.n_items)).astype(np.float32))
    weight, hr, why = choose_weight(lambda u: scores[torch.from_numpy(u)], ev, neighbours_from(split.train, ev.item_ids), 10)
    assert weight > 0 and hr[weight] > hr[0.0] and "standard errors" in why

    # the same items in random order: any gain is noise, the towers are left alone
    data, split = _data_split(_chains(300, 200, 6, seed=2, ordered=False), 200)
    ev = build_eval_set(data, split, "valid")
    weight, hr, why = choose_weight(lambda u: scores[torch.from_numpy(u)], ev, neighbours_from(split.train, ev.item_ids), 10)
    assert weight == 0.0, (hr, why)


def _write_csv(dirpath: Path, inter: pd.DataFrame) -> str:
    dirpath.mkdir()
    inter[["user_id", "item_id", "timestamp"]].to_csv(dirpath / "interactions.csv", index=False)
    return f"csv:{dirpath}"


def test_training_picks_a_weight_on_sequential_data_and_its_checkpoint_scores_with_it(tmp_path: Path):
    from towers.checkpoint import load_checkpoint
    from training.data import load_data, split_leave_last_out
    from training.evaluate import evaluate_model
    from training.train import TrainConfig, run

    spec = _write_csv(tmp_path / "walks", _chains(400, 300, 8, seed=3, ordered=True))
    res = run(TrainConfig(data=spec, artifacts=str(tmp_path / "a"), epochs=2, quiet=True, seed=0))
    chosen = res.metrics["neighbours"]
    assert chosen["weight"] > 0, chosen
    model = load_checkpoint(res.model_path)
    assert model.meta["neighbour_weight"] == chosen["weight"] and model.meta["neighbour_score"] == "cosine"
    data = load_data(spec)
    split = split_leave_last_out(data)
    blended = evaluate_model(model, data, split, which="test", ks=(10, 50, 100))
    assert blended["masked"]["HR@50"] == pytest.approx(res.metrics["test"]["masked"]["HR@50"])
    model.meta["neighbour_weight"] = 0.0
    alone = evaluate_model(model, data, split, which="test", ks=(50,))
    assert blended["masked"]["HR@50"] > alone["masked"]["HR@50"] + 0.05

    # fixed in the config: no choice, and 0 leaves the towers alone
    res0 = run(TrainConfig(data=spec, artifacts=str(tmp_path / "b"), epochs=2, quiet=True, seed=0, neighbour_weight=0))
    assert res0.metrics["neighbours"] == {"weight": 0.0, "why": "set in the config"}
    assert "neighbour_weight" not in load_checkpoint(res0.model_path).meta
