"""Bundles: write/validate/load, every kind of corruption refused, atomic publish, rollback, pruning,
and the Redis notification."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from index import bundle as B
from index.searcher import ExactSearcher, FaissSearcher, IdMap
from tests.factories import flip_byte, truncate
from tests.index.index_factories import Catalogue, tiny_catalogue, tiny_model, write_model_artifacts
from towers.checkpoint import TwoTowerModel
from towers.inference import UserEmbedder


@pytest.fixture(scope="module")
def trained(tiny_trained) -> tuple[Catalogue, TwoTowerModel, Path]:
    cat, model, root = tiny_trained
    return cat, model, root / "models" / "20240101T000000Z-aaaaaa" / "model.pt"


def stage(artifacts: Path, trained, version: str, *, vectors: np.ndarray | None = None) -> Path:
    """Write a bundle for the tiny catalogue into a staging dir (what the reindex job does)."""
    cat, model, model_path = trained
    vecs = model.embed_items(cat.items) if vectors is None else vectors
    id_map = IdMap(list(cat.items.index))
    searcher = FaissSearcher.build(vecs, id_map.faiss_ids, "Flat")
    inter = cat.interactions.sort_values("timestamp")
    hist = {u: list(g["item_id"])[-5:] for u, g in inter.groupby("user_id")}
    seen = {u: set(g["item_id"]) for u, g in inter.groupby("user_id")}
    popular = list(inter["item_id"].value_counts().index)
    out = B.staging_dir(artifacts, version)
    B.write_bundle(out, index_version=version, model_version="20240101T000000Z-aaaaaa", model_path=model_path,
                   searcher=searcher, id_map=id_map, item_vectors=vecs, popular=popular, users=cat.users,
                   histories=hist, seen=seen, recall=1.0, recall_k=100, n_eval_users=10, history_len=5)
    return out


def rewrite(bundle_dir: Path, name: str, writer) -> None:
    """Replace a file AND fix its manifest checksum: a buggy writer, so only the content checks
    (not the checksums) can catch what is wrong."""
    writer(bundle_dir / name)
    m = json.loads((bundle_dir / B.MANIFEST).read_text())
    m["files"][name] = {"sha256": B.sha256_file(bundle_dir / name), "bytes": (bundle_dir / name).stat().st_size}
    (bundle_dir / B.MANIFEST).write_text(json.dumps(m))


V1, V2, V3, V4 = (f"2024010{i}T000000Z-00000{i}" for i in range(1, 5))


def test_a_published_bundle_loads_with_everything_the_service_needs(tmp_path, trained) -> None:
    cat, model, _ = trained
    B.publish(tmp_path, stage(tmp_path, trained, V1))
    d = B.current_bundle_dir(tmp_path)
    assert d == tmp_path / "bundles" / V1
    b = B.load_bundle(d)
    assert b.index_version == V1 and b.manifest.n_items == 200 and b.manifest.dim == 16
    # serving loads only the user side, as NumPy arrays (user_tower.npz), and embeds as the model does
    assert isinstance(b.model, UserEmbedder)
    hist = [list(cat.items.index[:3]), []]
    np.testing.assert_allclose(b.model.embed_users(["1", "newcomer"], None, hist),
                               model.embed_users(["1", "newcomer"], None, hist), atol=1e-6)
    assert b.item_vectors.shape == (200, 16)
    # search results are the exact neighbours, translated back to catalogue ids
    q = b.model.embed_users(["1"], [b.user_features["1"]], [b.histories["1"]])
    (ids, scores), = b.search(q, 10)
    ex_s, ex_i = ExactSearcher(np.asarray(b.item_vectors), b.id_map.faiss_ids).search(q, 10)
    assert ids == b.id_map.to_items(ex_i[0]) and all(isinstance(i, int) for i in ids)
    np.testing.assert_allclose(scores, ex_s[0], atol=1e-5)
    # histories are the last 5 items oldest first; seen is every item
    u1 = cat.interactions[cat.interactions.user_id == "1"].sort_values("timestamp")
    assert b.histories["1"] == list(u1.item_id)[-5:]
    assert b.seen["1"] == frozenset(u1.item_id)
    assert b.user_features["1"]["age"] == cat.users.loc["1", "age"]
    assert b.popular[0] == cat.interactions.item_id.value_counts().index[0]


def test_similar_items_excludes_the_item_and_finds_its_genre(tmp_path, trained) -> None:
    cat, _, _ = trained
    B.publish(tmp_path, stage(tmp_path, trained, V1))
    b = B.load_bundle(B.current_bundle_dir(tmp_path))
    ids, scores = b.similar_items("7", 10)  # a wire id as a string means item 7
    assert len(ids) == 10 and 7 not in ids
    assert scores == sorted(scores, reverse=True)
    genre = cat.items.loc[7, "genre"]
    assert sum(cat.items.loc[i, "genre"] == genre for i in ids) >= 6  # chance would be 2 of 10
    with pytest.raises(KeyError, match="unknown item id 999"):
        b.similar_items(999, 5)


def test_string_item_ids_come_back_as_strings(tmp_path) -> None:
    cat = tiny_catalogue(n_items=30, n_users=10, per_user=4, str_ids=True)
    model = tiny_model(cat, steps=5)
    mp = write_model_artifacts(tmp_path / "m", cat, model) / "model.pt"
    B.publish(tmp_path, stage(tmp_path, (cat, model, mp), V1))
    b = B.load_bundle(B.current_bundle_dir(tmp_path))
    assert b.manifest.id_type == "str"
    ids, _ = b.similar_items("m0003", 5)
    assert all(isinstance(i, str) and i.startswith("m") for i in ids) and "m0003" not in ids
    assert all(isinstance(i, str) for i in b.histories["1"])


@pytest.mark.parametrize("damage,message", [
    (lambda d: truncate(d / B.INDEX), "bytes, manifest says"),
    (lambda d: flip_byte(d / B.ITEM_VECTORS), "sha256 does not match"),
    (lambda d: (d / B.POPULAR).unlink(), "popular.json: file missing"),
    (lambda d: (d / B.MANIFEST).unlink(), "manifest missing"),
    (lambda d: (d / B.MANIFEST).write_text("{not json"), "not valid JSON"),
    (lambda d: rewrite(d, B.INDEX, truncate), "cannot read FAISS index"),
    (lambda d: rewrite(d, B.ITEM_VECTORS, lambda p: np.save(p, np.zeros((200, 8), np.float32))),
     r"shape \(200, 8\), manifest says \(200, 16\)"),
    (lambda d: rewrite(d, B.ITEM_VECTORS, lambda p: np.save(p, np.full((200, 16), np.nan, np.float32))),
     "NaN or inf"),
    (lambda d: rewrite(d, B.ITEM_IDS, lambda p: p.write_text(json.dumps(
        {"id_type": "int", "faiss_ids": "item_id", "ids": [1] * 200}))), "duplicate item id 1"),
    (lambda d: rewrite(d, B.POPULAR, lambda p: p.write_text("[12345]")), "not in the catalogue"),
])
def test_a_damaged_bundle_is_refused_and_current_stays(tmp_path, trained, damage, message) -> None:
    B.publish(tmp_path, stage(tmp_path, trained, V1))
    staged = stage(tmp_path, trained, V2)
    damage(staged)
    with pytest.raises(B.BundleError, match=message):
        B.validate_bundle(staged)
    with pytest.raises(B.BundleError, match=message):
        B.publish(tmp_path, staged)
    assert B.current_version(tmp_path) == V1
    assert not (tmp_path / "bundles" / V2).exists() and not staged.exists()
    B.load_bundle(B.current_bundle_dir(tmp_path))  # the current bundle still loads


def test_a_model_of_another_dimension_is_refused(tmp_path, trained) -> None:
    cat, _, _ = trained
    other = tiny_model(cat, dim=8, steps=1)
    mp = write_model_artifacts(tmp_path / "m8", cat, other) / "model.pt"
    staged = stage(tmp_path, trained, V1)
    rewrite(staged, B.MODEL, lambda p: p.write_bytes(mp.read_bytes()))
    with pytest.raises(B.BundleError, match="model outputs dim 8, index dim is 16"):
        B.validate_bundle(staged)


def test_write_bundle_refuses_nan_vectors_before_writing_anything(tmp_path, trained) -> None:
    cat, model, _ = trained
    vecs = model.embed_items(cat.items)
    bad = vecs.copy()
    bad[3, 0] = np.inf
    with pytest.raises(Exception, match="NaN or inf"):
        stage(tmp_path, trained, V1, vectors=bad)
    assert B.current_version(tmp_path) is None and B.list_bundles(tmp_path) == []


def test_rollback_and_list(tmp_path, trained) -> None:
    for v in (V1, V2, V3):
        B.publish(tmp_path, stage(tmp_path, trained, v))
    assert B.current_version(tmp_path) == V3
    assert B.rollback(tmp_path).index_version == V2
    assert B.current_version(tmp_path) == V2
    assert B.rollback(tmp_path).index_version == V1
    with pytest.raises(B.BundleError, match="no bundle older than"):
        B.rollback(tmp_path)
    assert B.rollback(tmp_path, to=V3).index_version == V3
    listed = B.list_bundles(tmp_path)
    assert [i.version for i in listed] == [V3, V2, V1]
    assert [i.current for i in listed] == [True, False, False]
    assert listed[0].manifest is not None and listed[0].manifest.recipe["factory"] == "Flat"


def test_rollback_refuses_a_corrupt_target(tmp_path, trained) -> None:
    B.publish(tmp_path, stage(tmp_path, trained, V1))
    B.publish(tmp_path, stage(tmp_path, trained, V2))
    flip_byte(tmp_path / "bundles" / V1 / B.INDEX)
    with pytest.raises(B.BundleError, match="sha256"):
        B.rollback(tmp_path)
    assert B.current_version(tmp_path) == V2


def test_keep_n_prunes_old_bundles_but_never_the_current_one(tmp_path, trained) -> None:
    for v in (V1, V2, V3):
        B.publish(tmp_path, stage(tmp_path, trained, v), keep=2)
    assert [i.version for i in B.list_bundles(tmp_path)] == [V3, V2]
    B.rollback(tmp_path)  # current = V2
    B.publish(tmp_path, stage(tmp_path, trained, V4), keep=1)
    assert [i.version for i in B.list_bundles(tmp_path)] == [V4]
    B.rollback(tmp_path, to=V4)
    assert B.prune(tmp_path, keep=1) == []


def test_publish_refuses_a_manifest_version_outside_the_bundles_dir(tmp_path, trained) -> None:
    """The manifest names the directory a bundle is published as: ``../escaped`` once renamed the
    staged bundle out of bundles/ and pointed CURRENT at it."""
    staged = stage(tmp_path, trained, V1)
    m = json.loads((staged / B.MANIFEST).read_text())
    m["index_version"] = "../escaped"
    (staged / B.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(B.BundleError, match="not a version name"):
        B.publish(tmp_path, staged)
    assert not (tmp_path / "escaped").exists() and B.current_version(tmp_path) is None


def test_pointer_is_replaced_atomically(tmp_path, trained) -> None:
    """A reader polling CURRENT while bundles are published never sees a partial pointer or a
    pointer to a missing directory."""
    B.publish(tmp_path, stage(tmp_path, trained, V1))
    staged = [stage(tmp_path, trained, v) for v in (V2, V3, V4)]
    seen: list[str] = []
    errors: list[Exception] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                d = B.current_bundle_dir(tmp_path)
                assert d is not None and (d / B.MANIFEST).exists()
                seen.append(d.name)
            except Exception as exc:  # noqa: BLE001 - any failure is the test failing
                errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    for s in staged:
        B.publish(tmp_path, s, keep=10)
    # the reader keeps reading until it has seen the last publish (however slowly it is scheduled)
    deadline = time.monotonic() + 60
    while not (seen and seen[-1] == V4) and not errors and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    t.join()
    assert not errors
    assert set(seen) <= {V1, V2, V3, V4} and seen[-1] == V4
    assert not list((tmp_path / "bundles").glob(".*tmp"))  # no temp pointer left behind


def test_publish_notifies_subscribers_on_redis(tmp_path, trained, redis_client, redis_url, redis_prefix) -> None:
    pubsub = redis_client.pubsub()
    pubsub.subscribe(B.channel(redis_prefix))
    assert pubsub.get_message(timeout=2)["type"] == "subscribe"
    B.publish(tmp_path, stage(tmp_path, trained, V1), redis_url=redis_url, prefix=redis_prefix)
    msg = pubsub.get_message(timeout=5)
    assert msg is not None and msg["channel"] == f"{redis_prefix}:bundles".encode()
    assert json.loads(msg["data"]) == {"index_version": V1, "model_version": "20240101T000000Z-aaaaaa"}
    B.publish(tmp_path, stage(tmp_path, trained, V2), redis_url=redis_url, prefix=redis_prefix)
    B.rollback(tmp_path, redis_url=redis_url, prefix=redis_prefix)
    got = [json.loads(pubsub.get_message(timeout=5)["data"])["index_version"] for _ in range(2)]
    assert got == [V2, V1]
    pubsub.close()


def test_redis_down_does_not_fail_a_publish(tmp_path, trained, free_port, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="index.bundle"):
        B.publish(tmp_path, stage(tmp_path, trained, V1), redis_url=f"redis://127.0.0.1:{free_port}/0")
    assert B.current_version(tmp_path) == V1
    assert "could not notify" in caplog.text
