"""The last item's neighbour table: which pairs count, what each item keeps, what a query gets."""

from __future__ import annotations

import numpy as np
import pytest

from towers.neighbours import Neighbours, consecutive_pairs


def test_pairs_follow_each_users_time_order_and_never_cross_users():
    # user 7: items 3 (t=20), 1 (t=10), 5 (t=30) -> in time order 1, 3, 5; user 2: 4 then 4 then 6
    users = np.array([7, 7, 2, 7, 2, 2])
    items = np.array([3, 1, 4, 5, 4, 6])
    ts = np.array([20, 10, 1, 30, 2, 3])
    src, dst = consecutive_pairs(users, items, ts)
    assert sorted(zip(src.tolist(), dst.tolist(), strict=True)) == [(1, 3), (3, 5), (4, 6)]  # 4 -> 4 dropped


def test_equal_timestamps_keep_the_input_order_and_unknown_items_break_no_chain_into_a_pair():
    src, dst = consecutive_pairs(np.zeros(4, int), np.array([2, 0, -1, 3]), np.zeros(4, int))
    assert list(zip(src.tolist(), dst.tolist(), strict=True)) == [(2, 0)]  # 0 -> -1 and -1 -> 3 dropped


def test_counts_go_both_ways_and_each_item_keeps_its_most_frequent_neighbours():
    # 0-1 three times, 0-2 twice, 0-3 once
    src = np.array([0, 1, 0, 2, 0, 3])
    dst = np.array([1, 0, 2, 0, 1, 0])
    nb = Neighbours.from_pairs(src, dst, n_items=5, top=2)
    row0 = nb.cols[nb.indptr[0]:nb.indptr[1]].tolist()
    assert row0 == [1, 2]  # 3 (once) fell outside the top 2
    assert nb.counts[nb.indptr[0]:nb.indptr[1]].tolist() == [3.0, 2.0]
    assert nb.cols[nb.indptr[1]:nb.indptr[2]].tolist() == [0]  # 1's neighbour: 0, counted both ways
    assert nb.indptr[4] == nb.indptr[5]  # item 4 never sat next to anything
    assert nb.totals.tolist() == [5.0, 3.0, 2.0, 1.0, 0.0]  # each row's kept counts (0's third neighbour cut)


def test_a_query_gets_its_last_items_neighbours_scored_by_cosine_and_no_history_gets_nothing():
    # counts: 0-1 twice, 0-2 once, 2-3 once; totals T: 0 -> 3, 1 -> 2, 2 -> 2, 3 -> 1
    nb = Neighbours.from_pairs(np.array([0, 0, 0, 2]), np.array([1, 1, 2, 3]), n_items=4)
    q, items, bonus = nb.bonus(np.array([-1, 0, 3]))
    got = {(int(a), int(b)): float(c) for a, b, c in zip(q, items, bonus, strict=True)}
    assert got == pytest.approx({(1, 1): 2 / np.sqrt(3 * 2), (1, 2): 1 / np.sqrt(3 * 2), (2, 2): 1 / np.sqrt(1 * 2)})


def test_a_pair_with_a_popular_item_counts_for_less_than_the_same_pair_with_a_rare_one():
    # 0 sat next to 1 three times and next to 2 three times; 2 also sat next to 3..9 ten times each
    src = np.array([0] * 6 + [2] * 70)
    dst = np.array([1] * 3 + [2] * 3 + [x for x in range(3, 10) for _ in range(10)])
    nb = Neighbours.from_pairs(src, dst, n_items=10, top=4)  # 2 keeps 0 out of its top 4 (counts 3 < 10)
    q, items, bonus = nb.bonus(np.array([0]))
    got = dict(zip(items.tolist(), bonus.tolist(), strict=True))
    assert got[1] == pytest.approx(3 / np.sqrt(6 * 3)) and got[2] == pytest.approx(3 / np.sqrt(6 * 40))
    assert got[1] > 3 * got[2]
    assert (bonus > 0).all() and (bonus <= 1).all()


def test_a_saved_table_loads_equal_and_a_damaged_one_is_refused(tmp_path):
    nb = Neighbours.from_pairs(np.array([0, 1, 2]), np.array([1, 2, 3]), n_items=4)
    nb.save(tmp_path / "n.npz")
    back = Neighbours.load(tmp_path / "n.npz", n_items=4)
    for a, b in ((nb.indptr, back.indptr), (nb.cols, back.cols), (nb.counts, back.counts)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="catalogue of 5"):
        Neighbours.load(tmp_path / "n.npz", n_items=5)
    np.savez(tmp_path / "bad.npz", indptr=nb.indptr, cols=nb.cols + 10, counts=nb.counts)  # rows past the end
    with pytest.raises(ValueError, match="not a consistent neighbour table"):
        Neighbours.load(tmp_path / "bad.npz")
    np.savez(tmp_path / "short.npz", indptr=nb.indptr, cols=nb.cols, counts=nb.counts[:-1])  # a count missing
    with pytest.raises(ValueError, match="not a consistent neighbour table"):
        Neighbours.load(tmp_path / "short.npz")
