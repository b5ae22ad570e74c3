"""Searchers against exact ground truth, the id round trip, and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest

from index.searcher import (
    ExactSearcher,
    FaissSearcher,
    IdMap,
    Recipe,
    SearchError,
    choose_recipe,
    recall_at_k,
    search_users,
)
from tests.index.index_factories import clustered

DIM = 32


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = clustered(6000, DIM, n_clusters=40, seed=1)
    q = clustered(200, DIM, n_clusters=40, seed=1)  # same centres, fresh points
    ids = np.arange(6000, dtype=np.int64) * 7 + 3  # sparse, non-positional ids
    return x, ids, q


@pytest.fixture(scope="module")
def exact(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    x, ids, q = data
    return ExactSearcher(x, ids).search(q, 50)


def test_exact_searcher_matches_a_full_sort() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 8)).astype(np.float32)
    q = rng.standard_normal((5, 8)).astype(np.float32)
    scores, ids = ExactSearcher(x).search(q, 10)
    full = q @ x.T
    expect = np.argsort(-full, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(ids, expect)
    np.testing.assert_allclose(scores, np.take_along_axis(full, expect, axis=1), rtol=1e-5)
    assert scores.dtype == np.float32 and ids.dtype == np.int64


def test_the_flat_index_is_exact(data, exact) -> None:
    x, ids, q = data
    ex_s, ex_i = exact
    f_s, f_i = FaissSearcher.build(x, ids, "Flat").search(q, 50)
    assert recall_at_k(f_i, ex_i) == 1.0
    np.testing.assert_allclose(f_s, ex_s, atol=1e-5)
    # and the ground truth itself is a full sort, whichever block size the catalogue gets
    full = q @ x.T
    np.testing.assert_allclose(ex_s, -np.sort(-full, axis=1)[:, :50], atol=1e-5)


@pytest.mark.parametrize("recipe,floor", [
    (Recipe("IVF64,Flat", nprobe=16), 0.95),
    (Recipe("IVF64,SQfp16", nprobe=16), 0.95),  # the default for large catalogues
    (Recipe("HNSW32", ef_search=128), 0.95),
    (Recipe("IVF64,SQ8", nprobe=16), 0.9),
    (Recipe("IVF64,PQ8x4", nprobe=16), 0.3),  # 4-byte codes of 32 dims: lossy by design
    (Recipe("IVF64,PQ8x4,RFlat", nprobe=16, k_factor=8), 0.95),  # ...and re-ranked exactly
])
def test_approximate_indexes_find_most_true_neighbours(data, exact, recipe: Recipe, floor: float) -> None:
    x, ids, q = data
    s = FaissSearcher.build(x, ids, recipe)
    _, got = s.search(q, 50)
    r = recall_at_k(got, exact[1])
    assert r >= floor, f"{recipe.factory}: recall@50 {r:.3f} < {floor}"
    # ids come back as the ids we added, never row positions
    assert set(got[got >= 0].ravel()) <= set(ids.tolist())


def test_more_nprobe_means_more_recall(data, exact) -> None:
    x, ids, q = data
    s = FaissSearcher.build(x, ids, Recipe("IVF64,Flat", nprobe=1))
    r1 = recall_at_k(s.search(q, 50)[1], exact[1])
    s.apply_params(nprobe=64)
    r64 = recall_at_k(s.search(q, 50)[1], exact[1])
    assert r1 < 0.9 < r64 == pytest.approx(1.0)
    assert s.recipe.nprobe == 64
    s.apply_params(nprobe=1000)  # no more than the lists there are
    assert s.recipe.nprobe == s.nlist == 64
    # FAISS says how many lists an index has, whatever the factory string looks like
    assert FaissSearcher.build(x, ids, "PCA16,IVF32,SQ8").nlist == 32
    assert FaissSearcher.build(x, ids, "HNSW8").nlist is None


def test_save_load_round_trip_keeps_results_and_params(tmp_path, data) -> None:
    x, ids, q = data
    s = FaissSearcher.build(x, ids, Recipe("IVF64,Flat", nprobe=4))
    s.save(tmp_path / "index.faiss")
    loaded = FaissSearcher.load(tmp_path / "index.faiss", Recipe("IVF64,Flat", nprobe=4))
    a, b = s.search(q, 20), loaded.search(q, 20)
    np.testing.assert_array_equal(a[1], b[1])
    assert loaded.ntotal == 6000 and loaded.dim == DIM


@pytest.mark.parametrize("make", [
    lambda x, ids: ExactSearcher(x, ids),
    lambda x, ids: FaissSearcher.build(x, ids, "Flat"),
    lambda x, ids: FaissSearcher.build(x, ids, "HNSW8"),
])
def test_fewer_items_than_k_pads_with_minus_one(make) -> None:
    x = clustered(5, 8, n_clusters=2)
    ids = np.array([10, 20, 30, 40, 50])
    scores, got = make(x, ids).search(x[:2], 8)
    assert got.shape == (2, 8) and scores.shape == (2, 8)
    assert (got[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()
    assert sorted(got[0, :5].tolist()) == [10, 20, 30, 40, 50]
    assert got[0, 0] == 10 and got[1, 0] == 20  # each vector is its own best match


def test_bad_input_is_refused_with_a_clear_message() -> None:
    x = clustered(100, 8)
    ids = np.arange(100)
    bad = x.copy()
    bad[17, 3] = np.nan
    with pytest.raises(SearchError, match="NaN or inf.*row 17"):
        FaissSearcher.build(bad, ids, "Flat")
    with pytest.raises(SearchError, match="not unique"):
        FaissSearcher.build(x, np.r_[ids[:-1], 0], "Flat")
    with pytest.raises(SearchError, match="invalid FAISS factory string 'IVFbogus'"):
        FaissSearcher.build(x, ids, "IVFbogus")
    with pytest.raises(SearchError, match="needs at least 256 items"):
        FaissSearcher.build(x, ids, "IVF256,Flat")
    with pytest.raises(SearchError, match=r"shape \(B, 8\)"):
        ExactSearcher(x).search(np.zeros((2, 9), np.float32), 3)


def test_choose_recipe_is_exact_for_small_catalogues_and_ivf_for_large() -> None:
    assert choose_recipe(1_000).factory == "Flat"
    assert choose_recipe(100_000).kind == "flat"
    big = choose_recipe(1_000_000)
    assert big.kind == "ivf" and big.factory == "IVF1024,SQfp16" and big.nprobe


@pytest.mark.parametrize("make", [lambda x, ids: ExactSearcher(x, ids),
                                  lambda x, ids: FaissSearcher.build(x, ids, "Flat")])
def test_multi_interest_users_get_the_top_k_by_their_best_interest(make) -> None:
    """(B, K, D) users: one query per interest, merged. The first k results are exactly the top k
    items by the maximum over interests (brute force), each item once, best first."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 8)).astype(np.float32)
    ids = np.arange(400, dtype=np.int64) * 5 + 1
    users = rng.standard_normal((6, 3, 8)).astype(np.float32)
    users[1, 2] = users[1, 0]  # two identical interests: their items must not come back twice
    k = 25
    scores, got = search_users(make(x, ids), users, k)
    assert scores.shape == got.shape == (6, 3 * k)
    best = np.einsum("bkd,nd->bkn", users, x).max(axis=1)  # (B, N)
    for b in range(6):
        want = np.argsort(-best[b], kind="stable")[:k]
        np.testing.assert_array_equal(got[b, :k], ids[want])
        np.testing.assert_allclose(scores[b, :k], best[b, want], rtol=1e-5, atol=1e-5)
        real = got[b][got[b] >= 0]
        assert len(real) == len(set(real.tolist()))  # each item once
        assert (np.diff(scores[b][np.isfinite(scores[b])]) <= 1e-6).all()  # best first
        assert (scores[b][got[b] < 0] == -np.inf).all()  # what is left is padding
    # a single vector per user is the plain search
    one_s, one_i = search_users(make(x, ids), users[:, 0], k)
    ref_s, ref_i = make(x, ids).search(users[:, 0], k)
    np.testing.assert_array_equal(one_i, ref_i)
    with pytest.raises(SearchError, match="user vectors"):
        search_users(make(x, ids), users[None], k)


def test_recall_at_k() -> None:
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    approx = np.array([[4, 3, 9, 9], [5, 6, 7, -1]])
    assert recall_at_k(approx, exact) == pytest.approx((2 / 4 + 3 / 4) / 2)
    assert recall_at_k(approx, exact, k=2) == pytest.approx((0 + 1) / 2)
    assert recall_at_k(exact, exact) == 1.0 and recall_at_k(-np.ones_like(exact), exact) == 0.0
    with pytest.raises(ValueError, match="missing"):  # a padded ground truth would overstate recall
        recall_at_k(approx, approx)


def test_id_map_int_catalogue_uses_item_ids_as_faiss_ids(tmp_path) -> None:
    m = IdMap([101, 7, 9_000_000_000])
    assert m.id_type == "int" and m.uses_item_ids
    np.testing.assert_array_equal(m.faiss_ids, [101, 7, 9_000_000_000])
    assert m.row_of("7") == 1 and m.row_of(7) == 1 and " 101 " in m
    assert m.to_items(np.array([9_000_000_000, -1, 101])) == [9_000_000_000, 101]
    np.testing.assert_array_equal(m.to_rows(np.array([[7, -1]])), [[1, -1]])
    m.save(tmp_path / "ids.json")
    back = IdMap.load(tmp_path / "ids.json")
    assert back.ids == m.ids and back.id_type == "int"
    with pytest.raises(KeyError, match="unknown item id 8"):
        m.row_of(8)
    with pytest.raises(ValueError, match="not an integer"):
        m.parse("abc")


def test_id_map_str_catalogue_round_trips_through_faiss(tmp_path) -> None:
    names = ["tt0111161", "tt0068646", "tt0468569", "tt0071562"]
    m = IdMap(names)
    assert m.id_type == "str" and not m.uses_item_ids
    x = clustered(4, 8, n_clusters=4, noise=0.01)
    s = FaissSearcher.build(x, m.faiss_ids, "Flat")
    _, got = s.search(x[2:3], 1)
    assert m.to_items(got[0]) == ["tt0468569"]
    m.save(tmp_path / "ids.json")
    assert IdMap.load(tmp_path / "ids.json").ids == names


def test_id_map_negative_int_ids_fall_back_to_rows() -> None:
    m = IdMap([-5, 3])
    assert m.id_type == "int" and not m.uses_item_ids
    assert m.to_items(np.array([0, 1])) == [-5, 3]


def test_id_map_refuses_duplicates() -> None:
    with pytest.raises(SearchError, match="duplicate item id 'a'"):
        IdMap(["a", "b", "a"])
