"""The synthetic benchmark shapes' hidden draws (benchmarks/datasets.py): the ceiling column of
benchmarks/interests.py scores by them, so they must be the draws the written data came from."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from tests.ops._tools import REPO_ROOT

SHAPE_ARGS = dict(n_users=3000, n_items=600, n_topics=12, mean_len=8, min_len=3, zipf_a=1.0, p_next=0.3, noise=0.05)


@pytest.fixture(scope="module")
def bench_data():
    spec = importlib.util.spec_from_file_location("tt_benchmarks_datasets", REPO_ROOT / "benchmarks" / "datasets.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up by name
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def test_the_world_is_the_one_the_interactions_were_drawn_from(bench_data) -> None:
    shape = bench_data.Shape(**SHAPE_ARGS)
    inter, items = bench_data.generate(shape, truth=True)
    w = bench_data.world(shape)
    assert np.array_equal(items["topic"].to_numpy(), w.topic)
    # every pick from a user's topics lands in one of that user's topics
    picks = inter[inter["kind"] == bench_data.KIND_TOPIC]
    users = picks["user_id"].str[1:].astype(int).to_numpy()
    item_topic = w.topic[picks["item_id"].to_numpy() - 1]
    theirs = [set(w.user_topics[u][w.weights[u] > 0]) for u in users]
    assert all(t in s for t, s in zip(item_topic, theirs, strict=True))
    # a neighbour step stays inside the previous item's topic, within a few walk positions
    inter = inter.sort_values(["user_id", "timestamp"], kind="stable")
    prev = inter.groupby("user_id")["item_id"].shift(1)
    steps = inter[(inter["kind"] == bench_data.KIND_NEXT) & prev.notna()]
    a = steps["item_id"].to_numpy() - 1
    b = prev[steps.index].to_numpy().astype(np.int64) - 1
    # (the generator walks from the item it drew last, which may be a dropped repeat of an earlier one:
    # then the kept row before a step is another item, so a few steps look like jumps)
    same = w.topic[a] == w.topic[b]
    assert same.mean() > 0.9, same.mean()
    assert np.median(np.abs(w.slot[a] - w.slot[b])[same]) <= 3  # geometric(0.4): median 2; random: ~15


def test_next_item_probability_is_a_distribution_that_explains_the_draws(bench_data) -> None:
    shape = bench_data.Shape(**SHAPE_ARGS)
    inter, _ = bench_data.generate(shape)
    w = bench_data.world(shape)
    inter = inter.sort_values(["user_id", "timestamp"], kind="stable")
    seq = inter.groupby("user_id")["item_id"].agg(list)
    own, other = [], []
    rng = np.random.default_rng(1)
    for uid, items in seq.items():
        u = int(uid[1:])
        p = bench_data.next_item_probability(shape, w, u, items[0] - 1)
        assert p.min() >= 0 and p.sum() == pytest.approx(1.0, abs=1e-9)
        own.append(p[items[1] - 1])
        v = int(rng.integers(shape.n_users))  # someone else's topics, and another last item
        other.append(bench_data.next_item_probability(shape, w, v, int(rng.integers(shape.n_items)))[items[1] - 1])
    # the items users actually drew next are far likelier under their own probability than under a
    # stranger's: wrong user indexing, topics or walk order would erase that
    assert np.mean(np.log(own)) > np.mean(np.log(other)) + 1.0
