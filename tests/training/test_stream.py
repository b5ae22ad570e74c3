"""Data larger than memory: part files read in chunks, split per shard of users, batches per rank."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from towers.features import FeatureEncoder
from towers.schema import DataError
from training.config import TrainConfig
from training.data import load_data, split_leave_last_out
from training.pipeline import MemoryBatches, examples_from_rows
from training.stream import ShardReader, partition, side_tables, stream_source
from training.train import run, write_data_snapshot


def _rows(df: pd.DataFrame) -> set[tuple[str, int, int]]:
    return set(zip(df["user_id"].astype(str), df["item_id"].astype(np.int64), df["timestamp"].astype(np.int64),
                   strict=True))


def _write_parts(inter: pd.DataFrame, d: Path, parts: int = 3, fmt: str = "parquet") -> None:
    (d / "interactions").mkdir(parents=True)
    for k, idx in enumerate(np.array_split(np.arange(len(inter)), parts)):
        part = inter.iloc[idx]
        if fmt == "parquet":
            part.to_parquet(d / "interactions" / f"part-{k:03d}.parquet", index=False)
        else:
            part.to_csv(d / "interactions" / f"part-{k:03d}.csv", index=False)


@pytest.fixture
def log_with_ties() -> pd.DataFrame:
    """A small log where the leave-last-out split depends on the tie rule and on dropping duplicates:
    user "a" has two rows at the same last second (the later LINE is the test row), user "b" repeats
    a row exactly, user "c" has only two rows (all train)."""
    return pd.DataFrame({
        "user_id": ["a", "a", "b", "a", "b", "b", "a", "c", "b", "c", "a"],
        "item_id": [1, 2, 3, 3, 4, 4, 4, 5, 6, 6, 5],
        "timestamp": [10, 20, 30, 30, 40, 40, 50, 60, 70, 80, 50],
        "weight": 1.0,
    })


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_shards_split_exactly_like_the_whole_log_in_memory(tmp_path: Path, log_with_ties: pd.DataFrame,
                                                           fmt: str) -> None:
    big = load_data("synthetic", size="tiny", seed=2).interactions
    inter = pd.concat([log_with_ties, big], ignore_index=True)
    _write_parts(inter, tmp_path / "src", fmt=fmt)
    src = stream_source(tmp_path / "src")
    assert src is not None and len(src.files) == 3
    part, users, items = partition(src, tmp_path / "shards", shards=4, chunk_rows=50)
    assert part.rows == len(inter)
    _, _, catalogue, _, as_int = side_tables(src, users, items, part.item_id_is_int)
    assert as_int and len(catalogue) == inter["item_id"].nunique()

    enc = FeatureEncoder.fit(pd.DataFrame(index=pd.Index(sorted(inter["user_id"].unique()), dtype=object)),
                             catalogue, [], [])
    reader = ShardReader(part, enc, history_len=3)
    got = [reader.read(s).split for s in range(part.shards)]
    whole = split_leave_last_out(inter.drop_duplicates(["user_id", "item_id", "timestamp"]))
    for side in ("train", "valid", "test"):
        mine = pd.concat([getattr(g, side) for g in got])
        assert len(mine) == len(getattr(whole, side)), side
        assert _rows(mine) == _rows(getattr(whole, side)), side
    test = pd.concat([g.test for g in got]).set_index("user_id")["item_id"]
    assert test["a"] == 5 and test["b"] == 6 and "c" not in test  # the later line wins a tie
    users_per_shard = [set(g.train["user_id"]) | set(g.test["user_id"]) for g in got]
    assert sum(len(u) for u in users_per_shard) == len(set().union(*users_per_shard))  # a user in one shard


def test_a_kept_shard_trains_every_epoch_without_reading_its_files_again(tmp_path: Path) -> None:
    """A rank with one shard keeps the examples its preparation pass built: every epoch trains on
    exactly those, with the shard's files gone; a shard not kept is still read from disk."""
    import shutil

    from training.stream import ShardBatches

    inter = load_data("synthetic", size="tiny", seed=3).interactions
    _write_parts(inter, tmp_path / "src")
    src = stream_source(tmp_path / "src")
    assert src is not None
    part, users, items = partition(src, tmp_path / "shards", shards=2)
    _, _, catalogue, _, _ = side_tables(src, users, items, part.item_id_is_int)
    enc = FeatureEncoder.fit(pd.DataFrame(index=pd.Index(sorted(inter["user_id"].unique()), dtype=object)),
                             catalogue, [], [])
    reader = ShardReader(part, enc, history_len=3)
    kept = reader.read(0).examples
    from_disk = reader.read(1).examples
    reader.keep(0, kept)
    shutil.rmtree(part.shard_dir(0))

    def epoch_rows(shard: int, epoch: int) -> list[tuple[int, int]]:
        batches = ShardBatches(reader, [shard], batch=16, seed=0, rank=0, full_batches=False)
        batches.set_epoch(epoch)
        return sorted((int(u), int(i)) for b in batches for u, i in zip(b["user_row"], b["item_row"], strict=True))

    want = sorted(zip(kept.user_rows.tolist(), kept.item_rows.tolist(), strict=True))
    assert len(want) > 16
    assert epoch_rows(0, 1) == want and epoch_rows(0, 2) == want  # every example once an epoch
    assert epoch_rows(1, 1) == sorted(zip(from_disk.user_rows.tolist(), from_disk.item_rows.tolist(), strict=True))
    reader.keep(1, from_disk)  # keeping another shard lets the first one go: read again, from no files
    assert epoch_rows(0, 3) == []


def test_a_bad_row_in_a_later_part_names_the_file_and_row(tmp_path: Path, log_with_ties: pd.DataFrame) -> None:
    inter = log_with_ties.astype({"timestamp": object})
    inter.loc[9, "timestamp"] = "yesterday"  # the 10th row of the log: the 2nd of the 3rd part (4 + 4 + 3 rows)
    _write_parts(inter, tmp_path / "src", fmt="csv")
    src = stream_source(tmp_path / "src")
    assert src is not None
    with pytest.raises(DataError, match=r"part-002\.csv, row 2, column 'timestamp'.*'yesterday'"):
        partition(src, tmp_path / "shards", shards=2)


def test_a_single_file_is_streamed_only_when_asked(tmp_path: Path, log_with_ties: pd.DataFrame) -> None:
    log_with_ties.to_csv(tmp_path / "interactions.csv", index=False)
    assert stream_source(tmp_path) is None
    src = stream_source(tmp_path, force=True)
    assert src is not None and src.files == [tmp_path / "interactions.csv"]


def test_full_batches_wrap_around_and_replay_by_epoch() -> None:
    n = 10
    ex = examples_from_rows(np.arange(1, n + 1), np.arange(1, n + 1), np.zeros(n), None, history_len=2)
    one = MemoryBatches(ex, np.arange(n), batch=4, seed=0, rank=0, full_batches=False)
    sizes = [len(b["item_row"]) for b in one]
    assert sizes == [4, 4, 2]  # one rank: every example once, the last batch short
    full = MemoryBatches(ex, np.arange(n), batch=4, seed=0, rank=0, full_batches=True)
    it = iter(full)
    batches = [next(it) for _ in range(5)]
    assert all(len(b["item_row"]) == 4 for b in batches)
    seen = torch.cat([b["item_row"] for b in batches]).tolist()
    assert sorted(seen[:10]) == list(range(1, 11))  # the first lap holds every example once
    again = iter(MemoryBatches(ex, np.arange(n), batch=4, seed=0, rank=0, full_batches=True))
    assert [next(again)["item_row"].tolist() for _ in range(5)] == [b["item_row"].tolist() for b in batches]
    full.set_epoch(2)
    assert next(iter(full))["item_row"].tolist() != batches[0]["item_row"].tolist()


def _cfg(tmp_path: Path, data: str, **kw: object) -> TrainConfig:
    base = dict(data=data, artifacts=str(tmp_path / "art"), dim=16, hidden=(32,), feature_dim=8, history_len=10,
                batch_size=256, num_negatives=128, epochs=3, patience=5, lr=5e-3, temperature=0.1, quiet=True,
                num_threads=1, seed=0, shard_rows=2000)
    base.update(kw)
    return TrainConfig(**base)


def test_training_on_part_files_learns_and_resumes_exactly(tmp_path: Path) -> None:
    from training.baselines import popularity_scorer
    from training.evaluate import build_eval_set, evaluate_scores

    data = load_data("synthetic", n_users=300, n_items=500, n_clusters=5, interactions_per_user=20, seed=3)
    write_data_snapshot(data, tmp_path / "snap")
    src = tmp_path / "src"
    _write_parts(data.interactions, src)
    for name in ("users.parquet", "items.parquet"):
        (src / name).write_bytes((tmp_path / "snap" / name).read_bytes())

    whole = run(_cfg(tmp_path / "a", f"csv:{src}"))
    cfg = json.loads((whole.dir / "config.json").read_text())
    assert cfg["dataset"]["interactions"] == len(data.interactions)
    assert cfg["dataset"]["shards"] == -(-len(data.interactions) // 2000) > 1  # shard_rows=2000
    assert cfg["dataset"]["eval_users"] == 300
    assert not (whole.dir / "stream").exists()  # the shards are removed once the version is complete
    snap = load_data(f"csv:{whole.dir / 'data'}")  # the snapshot the evaluator and the reindex job read
    assert _rows(snap.interactions) == _rows(data.interactions)
    split = split_leave_last_out(data)
    ev = build_eval_set(data, split, "test")
    pop = evaluate_scores(popularity_scorer(split.train, ev), ev, ks=(50,))["masked"]["HR@50"]
    assert whole.metrics["test"]["masked"]["HR@50"] > pop + 0.05

    part = run(_cfg(tmp_path / "b", f"csv:{src}", stop_after_epoch=1))
    assert (part.dir / "stream" / "meta.json").is_file()  # kept for the resumed run
    resumed = run(_cfg(tmp_path / "b", f"csv:{src}", resume="latest"))
    a = torch.load(whole.dir / "model.pt", weights_only=True)
    b = torch.load(resumed.dir / "model.pt", weights_only=True)
    for side in ("user_tower", "item_tower"):
        assert all(torch.equal(a[side][k], b[side][k]) for k in a[side]), side
    assert [e["loss"] for e in whole.metrics["epochs"]] == [e["loss"] for e in resumed.metrics["epochs"]]


def test_synthetic_parts_are_written_a_chunk_of_users_at_a_time_and_stream(tmp_path: Path) -> None:
    from training.synthetic import write_synthetic_parts

    out = write_synthetic_parts(tmp_path / "syn", seed=4, n_users=250, n_items=80, n_clusters=4,
                                interactions_per_user=8, chunk_users=100)
    parts = sorted((tmp_path / "syn" / "interactions").iterdir())
    assert [p.name for p in parts] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    inter = pd.concat([pd.read_parquet(p) for p in parts])
    assert len(inter) == out["interactions"] and inter["user_id"].nunique() == 250
    per_part = [set(pd.read_parquet(p)["user_id"]) for p in parts]
    assert per_part[0].isdisjoint(per_part[1]) and max(len(u) for u in per_part) == 100
    assert not inter.duplicated(["user_id", "item_id"]).any()  # no user sees an item twice
    again = write_synthetic_parts(tmp_path / "again", seed=4, n_users=250, n_items=80, n_clusters=4,
                                  interactions_per_user=8, chunk_users=100)
    assert again == out
    assert pd.read_parquet(tmp_path / "again" / "interactions" / "part-00002.parquet").equals(pd.read_parquet(parts[2]))

    src = stream_source(tmp_path / "syn")  # a directory of parts: streamed
    assert src is not None and src.files == parts
    part, users, items = partition(src, tmp_path / "shards", shards=2)
    user_table, uspecs, item_table, ispecs, _ = side_tables(src, users, items, part.item_id_is_int)
    assert len(user_table) == 250 and len(item_table) == 80  # every item, seen or not
    assert {(f.name, f.kind) for f in uspecs} == {("segment", "categorical"), ("age", "numeric")}
    assert {(f.name, f.kind) for f in ispecs} == {("category", "categorical"), ("tags", "multi"), ("price", "numeric")}


def test_loader_workers_share_the_examples_instead_of_repeating_them() -> None:
    from training.pipeline import loader

    n = 50
    ex = examples_from_rows(np.arange(1, n + 1), np.arange(1, n + 1), np.zeros(n), None, history_len=2)
    batches = list(loader(MemoryBatches(ex, np.arange(n), batch=8, seed=0, rank=0, full_batches=False), workers=2))
    seen = torch.cat([b["item_row"] for b in batches]).tolist()
    assert sorted(seen) == list(range(1, n + 1))  # every example once: each worker built its half


def test_streamed_features_are_encoded_for_every_user_not_only_the_evaluation_sample(tmp_path: Path) -> None:
    from training.distributed import Dist
    from training.train import prepare_data, start_run

    data = load_data("synthetic", n_users=300, n_items=200, n_clusters=4, interactions_per_user=6, seed=5)
    write_data_snapshot(data, tmp_path / "snap")
    src = tmp_path / "src"
    _write_parts(data.interactions, src)
    for name in ("users.parquet", "items.parquet"):
        (src / name).write_bytes((tmp_path / "snap" / name).read_bytes())
    cfg = _cfg(tmp_path, f"csv:{src}", eval_users=30)
    prep = prepare_data(cfg, Dist(), start_run(cfg, Dist()))
    assert 0 < len(prep.data.users) < 100  # the evaluation sample
    assert prep.stats["users"] == 300
    for table, want in ((prep.user_table, prep.encoder.encode_user_table(data.users)),
                        (prep.item_table, prep.encoder.encode_item_table(data.items))):
        assert table.keys() == want.keys()
        for key in want:
            assert torch.equal(table[key], want[key]), key
