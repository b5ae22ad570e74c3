"""The one exact evaluator: metric values checked by hand, masking rules, scorer equivalence, baselines."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from training.baselines import ease_scorer, fit_ease, item_counts, popularity_scorer
from training.data import RecData, Split
from training.evaluate import (
    build_eval_set,
    embedding_scorer,
    evaluate_model,
    evaluate_scores,
    folding_share,
    format_table,
)


def _rows(triples: list[tuple[str, int, int]]) -> pd.DataFrame:
    return pd.DataFrame({"user_id": [u for u, _, _ in triples],
                         "item_id": np.array([i for _, i, _ in triples], dtype=np.int64),
                         "timestamp": np.array([t for _, _, t in triples], dtype=np.int64),
                         "weight": 1.0})


def _data(n_items: int, inter: pd.DataFrame, truth: dict | None = None) -> RecData:
    items = pd.DataFrame(index=pd.Index(np.arange(n_items, dtype=np.int64), name="item_id"))
    users = pd.DataFrame(index=pd.Index(sorted(inter["user_id"].unique()), name="user_id"))
    return RecData("t", inter, users, items, [], [], truth=truth)


def _split(inter: pd.DataFrame) -> Split:
    """Per-user leave-last-out by timestamp: last -> test, second last -> valid."""
    s = inter.sort_values(["user_id", "timestamp"], kind="stable")
    pos = s.groupby("user_id").cumcount(ascending=False)
    return Split(train=s[pos >= 2], valid=s[pos == 1], test=s[pos == 0])


@pytest.fixture
def tiny() -> tuple[RecData, Split]:
    # 5 items (0..4). u1: train 0, valid 1, test 2.  u2: train 3, valid 0, test 4.
    inter = _rows([("u1", 0, 1), ("u1", 1, 2), ("u1", 2, 3),
                   ("u2", 3, 1), ("u2", 0, 2), ("u2", 4, 3)])
    data = _data(5, inter)
    return data, _split(inter)


def test_metrics_match_hand_computed_values(tiny):
    data, split = tiny
    ev = build_eval_set(data, split, "test")
    assert ev.user_ids.tolist() == ["u1", "u2"]
    scores = np.array([
        # u1 target = item 2; items 0, 1 seen (train, valid). Raw order: 0, 1, 2 -> rank 2 (0-based)
        [0.9, 0.8, 0.7, 0.1, 0.2],
        # u2 target = item 4; seen 3, 0. Raw order: 3, 0, 1, 2, 4 -> rank 4
        [0.5, 0.4, 0.3, 0.9, 0.2],
    ], dtype=np.float32)
    r = evaluate_scores(scores, ev, ks=(1, 3))
    raw, masked = r["raw"], r["masked"]
    # raw: ranks 2 and 4
    assert raw["HR@1"] == 0.0
    assert raw["HR@3"] == pytest.approx(0.5)
    assert raw["Recall@3"] == pytest.approx(0.5)
    assert raw["NDCG@3"] == pytest.approx((1 / math.log2(4)) / 2)
    assert raw["MRR"] == pytest.approx((1 / 3 + 1 / 5) / 2)
    # masked: u1 -> items 0, 1 removed, target first; u2 -> 3, 0 removed: order 1, 2, 4 -> rank 2
    assert masked["HR@1"] == pytest.approx(0.5)
    assert masked["HR@3"] == pytest.approx(1.0)
    assert masked["NDCG@3"] == pytest.approx((1.0 + 1 / math.log2(4)) / 2)
    assert masked["MRR"] == pytest.approx((1.0 + 1 / 3) / 2)
    assert r["n_users"] == 2 and r["n_items"] == 5 and r["mrr"] == "full-rank"
    # per user, for breaking a metric down by groups: u1 hits at 1 once masked, u2 does not
    pu = evaluate_scores(scores, ev, ks=(1, 3), per_user=True)["per_user"]
    assert pu["masked"]["HR@1"].tolist() == [1.0, 0.0] and pu["raw"]["MRR"].tolist() == pytest.approx([1 / 3, 1 / 5])
    assert "per_user" not in r
    table = format_table({"m": r}, ks=(1, 3))
    assert table.splitlines()[0].split() == ["metric", "m"]
    cells = {" ".join(line.split()[:2]): line.split()[2] for line in table.splitlines()[1:]}
    assert cells["HR@3 masked"] == "1.0000" and cells["MRR raw"] == f"{(1 / 3 + 1 / 5) / 2:.4f}"


def test_valid_side_masks_train_only(tiny):
    data, split = tiny
    ev = build_eval_set(data, split, "valid")
    # u1 target = item 1 (valid), history = [0] only; the test item 2 is unseen at that time
    assert ev.history_item_ids(np.array([0])) == [[0]]
    assert ev.target_item_ids(0) == [1]
    scores = np.tile(np.array([0.9, 0.1, 0.8, 0.0, 0.0], dtype=np.float32), (2, 1))
    r = evaluate_scores(scores, ev, ks=(1,))
    # u1: masked order 2, 1 -> rank 1; u2 (target 0, history [3]): item 0 scores highest -> hit
    assert r["masked"]["HR@1"] == pytest.approx(0.5)
    assert r["masked"]["MRR"] == pytest.approx((1 / 2 + 1) / 2)


def test_masking_never_masks_the_target():
    # u1 watched item 1 in train and again as the test target (a re-watch): it must stay rankable
    inter = _rows([("u1", 1, 1), ("u1", 0, 2), ("u1", 1, 3)])
    data = _data(3, inter)
    ev = build_eval_set(data, _split(inter), "test")
    assert ev.history_item_ids(np.array([0])) == [[1, 0]]
    scores = np.array([[0.1, 0.9, 0.5]], dtype=np.float32)
    r = evaluate_scores(scores, ev, ks=(1,), mask_seen="masked")
    assert r["masked"]["HR@1"] == 1.0
    assert "raw" not in r


def test_ties_and_nan_follow_catalogue_order():
    inter = _rows([("u", 3, 1), ("u", 0, 2), ("u", 2, 3)])  # test target = item 2
    ev = build_eval_set(_data(4, inter), _split(inter), "test")
    r = evaluate_scores(np.zeros((1, 4), np.float32), ev, ks=(1, 3), mask_seen="raw")
    assert r["raw"]["MRR"] == pytest.approx(1 / 3)  # items 0, 1 come first among equals
    # a NaN never outranks a real score
    r = evaluate_scores(np.array([[np.nan, np.nan, 0.0, np.nan]], np.float32), ev, ks=(1,), mask_seen="raw")
    assert r["raw"]["HR@1"] == 1.0


def test_recall_counts_every_target():
    # a split with two test targets for one user (the evaluator is not limited to leave-one-out)
    train = _rows([("u", 0, 1)])
    test = _rows([("u", 2, 5), ("u", 4, 6)])
    data = _data(6, pd.concat([train, test]))
    ev = build_eval_set(data, Split(train=train, valid=train.iloc[0:0], test=test), "test")
    scores = np.array([[0.0, 0.1, 0.9, 0.8, 0.2, 0.3]], np.float32)  # order: 2, 3, 5, 4, 1, 0
    r = evaluate_scores(scores, ev, ks=(1, 3, 4), mask_seen="raw")["raw"]
    assert r["HR@1"] == 1.0 and r["Recall@1"] == pytest.approx(0.5)
    assert r["Recall@3"] == pytest.approx(0.5)
    assert r["Recall@4"] == pytest.approx(1.0)
    idcg = 1 + 1 / math.log2(3)
    assert r["NDCG@4"] == pytest.approx((1 + 1 / math.log2(5)) / idcg)
    assert r["NDCG@1"] == pytest.approx(1.0)  # ideal DCG@1 has one slot
    assert r["MRR"] == 1.0


def _clustered(n_users: int = 120, n_items: int = 60, n_clusters: int = 4, per_user: int = 12,
               seed: int = 0) -> RecData:
    """Users draw items mostly from their own cluster; popular items are shared by all."""
    rng = np.random.default_rng(seed)
    item_cluster = np.arange(n_items) % n_clusters
    rows = []
    for u in range(n_users):
        c = u % n_clusters
        own = np.flatnonzero(item_cluster == c)
        picks = rng.choice(own, size=per_user, replace=False)
        for t, i in enumerate(picks):
            rows.append((f"user{u}", int(i), t))
    inter = _rows(rows)
    truth = {"user_cluster": {f"user{u}": u % n_clusters for u in range(n_users)},
             "item_cluster": {i: int(item_cluster[i]) for i in range(n_items)}}
    return _data(n_items, inter, truth)


def test_ease_beats_popularity_on_clustered_data():
    data = _clustered()
    split = _split(data.interactions)
    ev = build_eval_set(data, split, "test")
    pop = evaluate_scores(popularity_scorer(split.train, ev), ev, ks=(10,))
    ease = evaluate_scores(ease_scorer(fit_ease(split.train, ev.item_ids, lam=10.0), ev), ev, ks=(10,))
    assert ease["masked"]["HR@10"] > pop["masked"]["HR@10"] + 0.2
    assert ease["masked"]["NDCG@10"] > pop["masked"]["NDCG@10"]
    counts = item_counts(split.train, ev.item_ids)
    assert counts.sum() == len(split.train)


def test_scorer_forms_give_identical_numbers():
    data = _clustered(seed=1)
    split = _split(data.interactions)
    ev = build_eval_set(data, split, "test")
    rng = np.random.default_rng(3)
    uvec = rng.normal(size=(ev.n_users, 8)).astype(np.float32)
    ivec = rng.normal(size=(ev.n_items, 8)).astype(np.float32)
    full = torch.from_numpy(uvec) @ torch.from_numpy(ivec).T
    before = full.clone()
    as_matrix = evaluate_scores(full.numpy(), ev)
    assert torch.equal(full, before)  # masking seen items never writes into the caller's scores
    as_pair = evaluate_scores((uvec, ivec), ev, chunk_users=7)  # chunking must not change anything
    as_fn = evaluate_scores(lambda users: full[torch.from_numpy(users)], ev, chunk_users=50)
    as_tensor = evaluate_scores(embedding_scorer(torch.from_numpy(uvec), torch.from_numpy(ivec)), ev)
    for other in (as_fn, as_tensor):  # same scores -> bit-identical metrics, whatever the chunking
        assert other["raw"] == as_matrix["raw"]
        assert other["masked"] == as_matrix["masked"]
    # per-chunk matmuls may round differently in the last bit, so only near-identical here
    assert as_pair["raw"] == pytest.approx(as_matrix["raw"], abs=1e-9)
    assert as_pair["masked"] == pytest.approx(as_matrix["masked"], abs=1e-9)


def test_folding_share_counts_items_from_untouched_clusters():
    data = _clustered(n_clusters=4)
    split = _split(data.interactions)
    ev = build_eval_set(data, split, "test")
    cl = np.array([data.truth["item_cluster"][i] for i in ev.item_ids])  # (N,)
    ucl = np.array([data.truth["user_cluster"][u] for u in ev.user_ids])  # (U,)
    in_cluster = (cl[None, :] == ucl[:, None]).astype(np.float32)  # (U, N)
    # 15 items per cluster, 11 seen before the test item and masked: the top-4 stays inside
    assert folding_share(in_cluster, data, split, k=4, ev=ev) == 0.0
    assert folding_share(1.0 - in_cluster, data, split, k=4, ev=ev) == 1.0
    # ranking everything by popularity mixes clusters: roughly 3/4 of the list is foreign
    share = folding_share(popularity_scorer(split.train, ev), data, split, k=20, ev=ev)
    assert 0.5 < share < 0.95


def test_evaluate_model_scores_the_towers_like_their_embeddings():
    from towers.checkpoint import TwoTowerModel
    from towers.features import FeatureEncoder
    from towers.model import TowerConfig

    data = _clustered(n_users=30, n_items=24, per_user=5)
    split = _split(data.interactions)
    torch.manual_seed(0)
    enc = FeatureEncoder.fit(data.users, data.items, [], [], history_len=5)
    model = TwoTowerModel.create(TowerConfig(model="youtubednn", dim=8, emb_dim=8, hidden=(16,)), enc).eval()
    ev = build_eval_set(data, split, "test")
    got = evaluate_model(model, data, split, "test", ks=(5,), ev=ev)
    # the same thing by hand: user tower on the history before the target, dot with the item tower
    users = np.arange(ev.n_users)
    uvec = model.embed_users(ev.user_ids.tolist(), None, ev.history_item_ids(users))
    ivec = model.embed_items(data.items)
    want = evaluate_scores((uvec, ivec), ev, ks=(5,))
    assert got["masked"] == pytest.approx(want["masked"])
    assert got["raw"] == pytest.approx(want["raw"])


def test_a_multi_interest_model_is_scored_by_each_users_best_interest():
    from towers.checkpoint import TwoTowerModel
    from towers.features import FeatureEncoder
    from towers.model import TowerConfig

    data = _clustered(n_users=30, n_items=24, per_user=5)
    split = _split(data.interactions)
    torch.manual_seed(0)
    enc = FeatureEncoder.fit(data.users, data.items, [], [], history_len=5)
    model = TwoTowerModel.create(TowerConfig(dim=8, emb_dim=8, hidden=(16,), history_encoder="attention",
                                             interests=3), enc).eval()
    with torch.no_grad():  # sharper heads: each interest attends to different history items, as trained ones do
        model.user_tower.hist_encoder.score.weight.mul_(50.0)
    ev = build_eval_set(data, split, "test")
    got = evaluate_model(model, data, split, "test", ks=(5,), ev=ev)
    uvec = model.embed_users(ev.user_ids.tolist(), None, ev.history_item_ids(np.arange(ev.n_users)))  # (U, 3, D)
    best = np.einsum("ukd,nd->ukn", uvec, model.embed_items(data.items)).max(axis=1)  # (U, N)
    assert got["masked"] == pytest.approx(evaluate_scores(best, ev, ks=(5,))["masked"])
    # and not what the first interest alone would give
    first = evaluate_scores((uvec[:, 0], model.embed_items(data.items)), ev, ks=(5,), per_user=True)
    assert not np.array_equal(first["per_user"]["masked"]["MRR"],
                              evaluate_scores(best, ev, ks=(5,), per_user=True)["per_user"]["masked"]["MRR"])


def test_bad_scorer_shape_is_a_clear_error(tiny):
    data, split = tiny
    ev = build_eval_set(data, split, "test")
    with pytest.raises(ValueError, match="shape"):
        evaluate_scores(np.zeros((2, 4), np.float32), ev)
    with pytest.raises(ValueError, match="which"):
        build_eval_set(data, split, "train")


def _saved_model(tmp_path, data: RecData, version: str = "20260101T000000Z-abcdef"):
    """A model version directory as the training job leaves it: model.pt, data/ snapshot, LATEST."""
    from towers.checkpoint import TwoTowerModel, save_checkpoint
    from towers.features import FeatureEncoder
    from towers.model import TowerConfig

    torch.manual_seed(0)
    enc = FeatureEncoder.fit(data.users, data.items, [], [], history_len=5)
    model = TwoTowerModel.create(TowerConfig(model="dssm", dim=8, emb_dim=8, hidden=(16,)), enc).eval()
    mdir = tmp_path / "models" / version
    (mdir / "data").mkdir(parents=True)
    save_checkpoint(mdir / "model.pt", model)
    data.interactions.to_parquet(mdir / "data" / "interactions.parquet", index=False)
    (tmp_path / "models" / "LATEST").write_text(version + "\n")
    return mdir, model


def _eval_cli(argv: list[str]) -> int:
    import argparse

    from training.evaluate import register_eval

    parser = argparse.ArgumentParser(prog="twotower")
    register_eval(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_eval_command_prints_table_and_writes_eval_json(tmp_path, capsys):
    import json

    data = _clustered(n_users=40, n_items=24, per_user=6)
    mdir, model = _saved_model(tmp_path, data)
    assert _eval_cli(["eval", "--artifacts", str(tmp_path), "--ks", "5,10"]) == 0
    out = capsys.readouterr().out
    assert "popularity" in out and "HR@5 masked" in out and "Recall@10 raw" in out
    saved = json.loads((mdir / "eval.json").read_text())
    assert saved["model_version"] == mdir.name and saved["split"] == "test"
    assert set(saved) >= {"model", "popularity"}
    # the numbers are the evaluator's own on the snapshot the model was saved with
    from training.data import load_data, split_leave_last_out

    snap = load_data(f"csv:{mdir / 'data'}")
    split = split_leave_last_out(snap)
    want = evaluate_model(model, snap, split, "test", ks=(5, 10))
    assert saved["model"]["masked"] == pytest.approx(want["masked"])
    assert saved["model"]["n_users"] == 40


def test_eval_command_without_a_model_is_a_clear_error(tmp_path):
    from towers.schema import DataError

    with pytest.raises(DataError, match="LATEST"):
        _eval_cli(["eval", "--artifacts", str(tmp_path)])
    with pytest.raises(DataError, match="no model.pt"):
        _eval_cli(["eval", "--artifacts", str(tmp_path), "--model-version", "nope"])
    with pytest.raises(ValueError, match="--ks"):
        _eval_cli(["eval", "--artifacts", str(tmp_path), "--ks", "a,b"])


def test_eval_never_reads_a_model_outside_the_artifacts_root(tmp_path) -> None:
    """``--model-version ../x`` or a models/LATEST naming ``..`` once evaluated (and wrote eval.json
    into) a directory outside the artifacts root."""
    import shutil

    from towers.schema import DataError

    art = tmp_path / "a" / "artifacts"
    outside, _ = _saved_model(tmp_path / "a", _clustered(n_users=12, n_items=24, per_user=6), version="outside")
    (art / "models").mkdir(parents=True)
    shutil.copy(outside / "model.pt", art / "model.pt")  # models/.. is the artifacts root itself
    for bad in ("../../models/outside", str(outside), ".."):
        with pytest.raises(DataError, match="model version"):
            _eval_cli(["eval", "--artifacts", str(art), "--model-version", bad])
        (art / "models" / "LATEST").write_text(bad + "\n")
        with pytest.raises(DataError, match="LATEST"):
            _eval_cli(["eval", "--artifacts", str(art)])
    assert not (outside / "eval.json").exists() and not (art / "eval.json").exists()
