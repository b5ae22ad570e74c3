"""The reindex job end to end: from models/<v>/ to a published bundle, cold-start items, the recall
gate, and bad input refused through the real CLI with nothing published."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from index import bundle as B
from index.reindex import ReindexConfig, measure_recall, run
from index.searcher import ExactSearcher, FaissSearcher, Recipe, recall_at_k
from tests.index.conftest import TINY
from tests.index.index_factories import clustered, tiny_catalogue, tiny_model, write_model_artifacts
from towers.checkpoint import save_checkpoint
from twotower.cli import main


@pytest.fixture
def artifacts(tmp_path, tiny_trained) -> Path:
    dest = tmp_path / "artifacts"
    shutil.copytree(tiny_trained[2], dest)
    return dest


def test_reindex_publishes_a_bundle_the_service_can_load(artifacts) -> None:
    m = run(ReindexConfig(artifacts=artifacts))
    assert B.current_version(artifacts) == m.index_version
    assert m.model_version == "20240101T000000Z-aaaaaa"
    assert m.n_items == 200 and m.dim == 16 and m.recipe["factory"] == "Flat"
    assert m.recall == 1.0 and m.recall_k == 100 and m.n_eval_users == 80 and m.n_cold_items == 0
    b = B.load_bundle(B.current_bundle_dir(artifacts))
    assert len(b.histories) == 80 and all(len(h) == 5 for h in b.histories.values())  # history_len = 5
    assert all(len(s) == 15 for s in b.seen.values())
    assert set(b.popular) <= set(b.id_map.ids)


def test_a_model_that_blends_neighbours_publishes_their_table_and_a_broken_one_is_refused(artifacts, caplog) -> None:
    from towers.checkpoint import load_checkpoint
    from towers.neighbours import set_weight

    plain = run(ReindexConfig(artifacts=artifacts))
    assert plain.neighbour_weight == 0.0 and B.NEIGHBOURS not in plain.files
    assert B.load_bundle(B.current_bundle_dir(artifacts)).neighbours is None

    mdir = artifacts / "models" / "20240101T000000Z-aaaaaa"
    model = load_checkpoint(mdir / "model.pt")
    # a weight from before the cosine bonus (untagged, chosen for log(1 + n)): the towers alone, said so
    save_checkpoint(mdir / "model.pt", model, {**model.meta, "neighbour_weight": 0.25})
    with caplog.at_level("WARNING", logger="towers.neighbours"):
        old = run(ReindexConfig(artifacts=artifacts))
    assert old.neighbour_weight == 0.0 and B.NEIGHBOURS not in old.files
    assert "chosen for the log(1 + n) bonus" in caplog.text

    meta = dict(model.meta)
    set_weight(meta, 0.25)  # as training chose it
    save_checkpoint(mdir / "model.pt", model, meta)
    m = run(ReindexConfig(artifacts=artifacts))
    assert m.neighbour_weight == 0.25 and m.neighbour_score == "cosine" and B.NEIGHBOURS in m.files
    b = B.load_bundle(B.current_bundle_dir(artifacts))
    nb = b.neighbours
    assert nb is not None and nb.n_items == m.n_items
    # every user's consecutive items (in time order) are each other's neighbours
    log = pd.read_parquet(mdir / "data" / "interactions.parquet").sort_values(["user_id", "timestamp"], kind="stable")
    for _, g in list(log.groupby("user_id"))[:10]:
        rows = b.id_map.rows_of(g["item_id"].tolist())
        for a, c in zip(rows[:-1], rows[1:], strict=True):
            if a != c:
                assert c in nb.cols[nb.indptr[a]:nb.indptr[a + 1]]

    # a bundle published before the cosine bonus (no neighbour_score): served by its towers alone
    bdir = B.current_bundle_dir(artifacts)
    doc = json.loads((bdir / B.MANIFEST).read_text())
    del doc["neighbour_score"]
    (bdir / B.MANIFEST).write_text(json.dumps(doc))
    caplog.clear()
    with caplog.at_level("WARNING", logger="towers.neighbours"):
        assert B.load_bundle(bdir).neighbours is None
    assert "chosen for the log(1 + n) bonus" in caplog.text

    (bdir / B.NEIGHBOURS).unlink()
    with pytest.raises(B.BundleError, match="neighbours.npz: file missing"):
        B.validate_bundle(bdir)


def test_a_new_item_is_searchable_next_to_items_with_its_content(artifacts, tmp_path) -> None:
    new_items = tmp_path / "new_items.csv"
    new_items.write_text("item_id,genre,tags,year,ignored_extra\n"
                         "5001,horror,horror-tag|bw,1990,x\n"
                         "5002,comedy,comedy-tag|colour,2005,y\n"
                         "2,scifi,scifi-tag|bw,1980,z\n")  # item 2 gets new features
    m = run(ReindexConfig(artifacts=artifacts, items=new_items))
    assert m.n_items == 202 and m.n_cold_items == 2 and m.extra["n_extra_items"] == 3
    b = B.load_bundle(B.current_bundle_dir(artifacts))
    assert 5001 in b.id_map and 5002 in b.id_map
    cat = tiny_catalogue(**TINY).items
    for new_id, genre in ((5001, "horror"), (5002, "comedy")):
        ids, _ = b.similar_items(new_id, 10)
        same = sum(cat.loc[i, "genre"] == genre for i in ids if i in cat.index)
        assert same >= 7, f"item {new_id}: only {same}/10 neighbours are {genre}"
    # and a user who likes horror can now be recommended the new horror item
    horror_fans = [u for u, h in b.histories.items() if all(cat.loc[i, "genre"] == "horror" for i in h)]
    q = b.model.embed_users(horror_fans, [b.user_features[u] for u in horror_fans],
                            [b.histories[u] for u in horror_fans])
    hits = [5001 in ids for ids, _ in b.search(q, 60)]
    assert np.mean(hits) > 0.5


def test_string_item_ids_end_to_end(tmp_path) -> None:
    cat = tiny_catalogue(n_items=40, n_users=15, per_user=5, str_ids=True)
    write_model_artifacts(tmp_path, cat, tiny_model(cat, steps=5))
    new_items = tmp_path / "new.csv"
    new_items.write_text("item_id,genre,tags,year\nnew-01,drama,drama-tag,2001\n")
    m = run(ReindexConfig(artifacts=tmp_path, items=new_items))
    b = B.load_bundle(B.current_bundle_dir(tmp_path))
    assert m.id_type == "str" and "new-01" in b.id_map and m.n_cold_items == 1
    ids, _ = b.similar_items("new-01", 5)
    assert all(isinstance(i, str) for i in ids)


def test_ivf_nprobe_is_raised_until_recall_clears_the_floor(artifacts) -> None:
    m = run(ReindexConfig(artifacts=artifacts, factory="IVF16,Flat", recall_floor=0.97))
    tried = m.extra["recall_tried"]
    assert m.recall >= 0.97 and m.recipe["nprobe"] == tried[-1][0]
    assert all(r < 0.97 for _, r in tried[:-1])  # stopped at the first setting that clears the floor
    b = B.load_bundle(B.current_bundle_dir(artifacts))
    assert b.manifest.recipe["nprobe"] == m.recipe["nprobe"]


def test_ivf_nprobe_is_lowered_while_recall_still_clears_the_floor() -> None:
    x = clustered(4000, 16, n_clusters=20, seed=3)
    q = clustered(200, 16, n_clusters=20, seed=3)
    ids = np.arange(4000, dtype=np.int64)
    _, truth = ExactSearcher(x, ids).search(q, 50)
    s = FaissSearcher.build(x, ids, Recipe("IVF64,Flat", nprobe=32))  # a generous start
    rep = measure_recall(s, truth, q, 50, floor=0.9, tune_nprobe=True, tune_ef=False)
    chosen = rep.recipe.nprobe
    assert chosen is not None and chosen < 32, rep.tried  # cheaper than the start...
    assert rep.recall >= 0.9 and s.recipe.nprobe == chosen  # ...still clears the floor, and is applied
    measured = dict(rep.tried)
    assert measured[chosen] == rep.recall
    # the next cheaper setting was measured and fell short (or there is none)
    assert chosen == 1 or measured[chosen // 2] < 0.9
    _, got = s.search(q, 50)
    assert recall_at_k(got, truth, 50) == rep.recall


def test_a_recall_below_the_floor_publishes_nothing(artifacts) -> None:
    first = run(ReindexConfig(artifacts=artifacts))
    with pytest.raises(B.BundleError, match=r"recall@100 of IVF16,PQ2x4 \(nprobe=1\) is 0\.\d+ .*below the floor"):
        run(ReindexConfig(artifacts=artifacts, factory="IVF16,PQ2x4", nprobe=1, recall_floor=0.99))
    assert B.current_version(artifacts) == first.index_version
    assert [i.version for i in B.list_bundles(artifacts)] == [first.index_version]
    assert not list((artifacts / "bundles").glob(".staging-*"))


def test_a_model_producing_nan_vectors_is_refused(artifacts) -> None:
    from towers.checkpoint import load_checkpoint

    mp = artifacts / "models" / "20240101T000000Z-aaaaaa" / "model.pt"
    model = load_checkpoint(mp)
    with torch.no_grad():
        model.item_tower.id_emb.weight[5].fill_(float("nan"))
    save_checkpoint(mp, model)
    with pytest.raises(B.BundleError, match="NaN/inf vectors for 1 item.*first item 5"):
        run(ReindexConfig(artifacts=artifacts))
    assert B.current_version(artifacts) is None


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("csv,message", [
    ("item_id,genre,tags,year\n7001,drama,x,2000\n\n7001,comedy,y,2001\n",
     r"new\.csv, line 4, column 'item_id': duplicate item id 7001 \(first at line 2\)"),
    ("item_id,genre,year\n7001,drama,2000\n", r"new\.csv, column 'tags': missing feature column 'tags'"),
    ("item_id,genre,tags,year\n7001,drama,x,2000\nabc,drama,x,2000\n",
     r"new\.csv, line 3, column 'item_id': item id 'abc' is not an integer"),
    ("item_id,genre,tags,year\n7001,drama,x,soon\n", r"new\.csv, line 2, column 'year': value 'soon' is not a number"),
    ("genre,tags,year\ndrama,x,2000\n", r"new\.csv, column 'item_id': no item_id column"),
])
def test_bad_item_tables_exit_2_with_one_clear_line(artifacts, tmp_path, capsys, csv, message) -> None:
    rc, _, _ = _cli(capsys, "reindex", "--artifacts", str(artifacts), "--redis-url", "")
    assert rc == 0
    before = B.current_version(artifacts)
    bad = tmp_path / "new.csv"
    bad.write_text(csv)
    rc, out, err = _cli(capsys, "reindex", "--artifacts", str(artifacts), "--items", str(bad), "--redis-url", "")
    assert rc == 2
    assert err.startswith("twotower reindex: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert B.current_version(artifacts) == before and len(B.list_bundles(artifacts)) == 1


def test_cli_errors_for_a_missing_model_and_a_bad_flag(tmp_path, capsys) -> None:
    rc, _, err = _cli(capsys, "reindex", "--artifacts", str(tmp_path), "--redis-url", "")
    assert rc == 2 and "models/LATEST does not exist" in err
    with pytest.raises(SystemExit) as exc:
        main(["reindex", "--artifacts", str(tmp_path), "--recall-floor", "1.5"])
    # the same wording as every flag of every job (towers.validation): the flag, the range, the value
    assert exc.value.code == 2
    assert "argument --recall-floor: expected a number within [0, 1], got 1.5" in capsys.readouterr().err


def test_cli_list_and_rollback(artifacts, capsys) -> None:
    rc, out, _ = _cli(capsys, "reindex", "--artifacts", str(artifacts), "--redis-url", "")
    assert rc == 0 and out.startswith("published * ") and "recall@100=1.0000" in out
    first = B.current_version(artifacts)
    _cli(capsys, "reindex", "--artifacts", str(artifacts), "--redis-url", "", "--factory", "HNSW16")
    second = B.current_version(artifacts)
    assert second != first
    rc, out, _ = _cli(capsys, "reindex", "--artifacts", str(artifacts), "--list")
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 2
    assert lines[0].startswith(f"* {second}") and "recipe=HNSW16 ef_search=" in lines[0]
    assert lines[1].startswith(f"  {first}") and "recipe=Flat" in lines[1]
    rc, out, _ = _cli(capsys, "reindex", "--artifacts", str(artifacts), "--rollback", "--redis-url", "")
    assert rc == 0 and first in out and B.current_version(artifacts) == first
    rc, _, err = _cli(capsys, "reindex", "--artifacts", str(artifacts), "--rollback", "--redis-url", "")
    assert rc == 2 and "no bundle older than" in err


def test_new_items_from_parquet_with_list_features(artifacts, tmp_path) -> None:
    import pandas as pd

    new = pd.DataFrame({"genre": ["drama"], "tags": [["drama-tag", "bw"]], "year": [1999.0]},
                       index=pd.Index([9001], name="item_id"))
    path = tmp_path / "new.parquet"
    new.to_parquet(path)
    m = run(ReindexConfig(artifacts=artifacts, items=path))
    assert m.n_items == 201 and m.n_cold_items == 1
    b = B.load_bundle(B.current_bundle_dir(artifacts))
    ids, _ = b.similar_items(9001, 10)
    cat = tiny_catalogue(**TINY).items
    assert sum(cat.loc[i, "genre"] == "drama" for i in ids) >= 7


def test_a_missing_items_file_is_a_clear_error(artifacts, tmp_path, capsys) -> None:
    rc, _, err = _cli(capsys, "reindex", "--artifacts", str(artifacts), "--items", str(tmp_path / "nope.csv"),
                      "--redis-url", "")
    assert rc == 2 and "nope.csv: file not found" in err and B.current_version(artifacts) is None


def test_a_recall_floor_may_be_1_but_not_more() -> None:
    """A share that can be everything (a recall floor) takes 1.0, unlike a dropout rate; both are
    checked by their config, not by their CLI."""
    from towers.validation import ConfigError

    assert ReindexConfig(recall_floor=1.0).recall_floor == 1.0
    for bad in (1.01, -0.1):
        with pytest.raises(ConfigError, match=r"recall floor must be a number within \[0, 1\]"):
            ReindexConfig(recall_floor=bad)
    with pytest.raises(ConfigError, match="nprobe must be a positive integer, got 0"):
        ReindexConfig(nprobe=0)
