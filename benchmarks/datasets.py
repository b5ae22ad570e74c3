"""The quality benchmark's datasets: two MovieLens sets from ``../shared/data`` and two synthetic
shapes unlike them, written once as ``csv:DIR`` directories so every tool (our trainer, ``twotower
tune``, the torch-rechub runner, EASE) reads the very same files.

    python benchmarks/datasets.py            # write (or check) .bench/data/<shape>/ and print stats

Why these shapes. MovieLens has a compact catalogue (1.7k / 9.7k movies) that most users have seen
a good share of, and long histories (median 65 / 70 ratings per user). A user's own data often looks
nothing like that:

- ``synthetic-longtail``: a 20,000-item catalogue with Zipf popularity (exponent 1.0) and histories
  of ~20 items (log-normal), so most items are seen a handful of times or never and the head holds
  the traffic; what a shop or a marketplace looks like.
- ``synthetic-short``: 20,000 users with ~6 interactions each (session-like) over 5,000 items; most
  users have 3 to 8 rows, so the model reads 1 to 6 items of history.

Both are sequential the way logs are: a user has one to three interest topics; each step is, with
probability ``p_next``, a neighbour of the previous item inside its topic (the next episode, an
accessory, a sequel: a walk of a few positions along the topic's item order), with probability
``noise`` a popular item from anywhere, otherwise a fresh pick from one of the user's topics weighted
by popularity. Items carry a category (the topic 80 % of the time, a random one otherwise) and a
price whose level depends on the topic: informative, not a giveaway. The parameters were fixed once,
from these descriptions, before any model was run on them; they are not tuned to favour any model.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
DATA_ROOT = REPO / ".bench" / "data"
SHARED = REPO.parent / "shared" / "data"


@dataclass(frozen=True)
class Shape:
    n_users: int
    n_items: int
    n_topics: int
    mean_len: float      # mean interactions per user (log-normal, sigma 0.6)
    min_len: int
    zipf_a: float        # popularity ~ 1 / rank**zipf_a over the whole catalogue
    p_next: float        # share of steps that move to a neighbour of the previous item
    noise: float         # share of steps that pick a popular item from anywhere
    seed: int = 0


SHAPES: dict[str, Shape] = {
    "synthetic-longtail": Shape(n_users=8000, n_items=20_000, n_topics=50, mean_len=20, min_len=3,
                                zipf_a=1.0, p_next=0.25, noise=0.05),
    "synthetic-short": Shape(n_users=20_000, n_items=5000, n_topics=30, mean_len=6, min_len=3,
                             zipf_a=0.8, p_next=0.35, noise=0.05),
}

# name -> data spec, in the benchmark's order
DATASETS: dict[str, str] = {
    "ml-100k": f"movielens:{SHARED / 'ml-100k'}",
    "ml-latest-small": f"movielens:{SHARED / 'ml-latest-small'}",
    "synthetic-longtail": f"csv:{DATA_ROOT / 'synthetic-longtail'}",
    "synthetic-short": f"csv:{DATA_ROOT / 'synthetic-short'}",
}


# how each interaction was drawn (``generate(..., truth=True)``'s "kind" column)
KIND_TOPIC, KIND_NOISE, KIND_NEXT = 0, 1, 2


@dataclass(frozen=True)
class World:
    """What the generator draws before any interaction, and what a model has to discover: each item's
    topic and popularity, the order of the walk inside each topic, each user's topics and their weights.
    Not written to the benchmark's files."""

    topic: np.ndarray         # (n_items,) topic of each item (generator item i = item id i + 1)
    pop: np.ndarray           # (n_items,) unnormalised popularity, 1 / rank ** zipf_a
    order: np.ndarray         # item numbers grouped by topic, each topic in its walk order
    slot: np.ndarray          # (n_items,) each item's position in ``order``
    starts: np.ndarray        # (n_topics,) where each topic's items start in ``order``
    sizes: np.ndarray         # (n_topics,) items per topic
    user_topics: np.ndarray   # (n_users, 3) the user's topics (the first ``k`` count)
    weights: np.ndarray       # (n_users, 3) how often the user picks each of them (0 past ``k``)


def _draw_world(shape: Shape, rng: np.random.Generator) -> World:
    n_items, n_topics = shape.n_items, shape.n_topics
    topic = rng.integers(0, n_topics, n_items)
    pop = 1.0 / (rng.permutation(n_items) + 1.0) ** shape.zipf_a  # global Zipf by a random rank
    # inside a topic: items in a random "walk order" (neighbours are related items)
    order = np.lexsort((rng.random(n_items), topic))  # item positions grouped by topic
    sizes = np.bincount(topic, minlength=n_topics)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    slot = np.empty(n_items, dtype=np.int64)
    slot[order] = np.arange(n_items)  # item -> its slot in ``order``
    n_users = shape.n_users
    k = rng.integers(1, 4, n_users)  # 1-3 topics per user
    user_topics = rng.integers(0, n_topics, (n_users, 3))
    weights = rng.dirichlet(np.ones(3), n_users) * (np.arange(3)[None, :] < k[:, None])
    weights /= weights.sum(axis=1, keepdims=True)
    return World(topic=topic, pop=pop, order=order, slot=slot, starts=starts, sizes=sizes,
                 user_topics=user_topics, weights=weights)


def world(shape: Shape) -> World:
    """The hidden draws behind ``generate(shape)`` (the same seed, the same draws)."""
    return _draw_world(shape, np.random.default_rng(shape.seed))


# a walk step moves geometric(WALK_P) positions, either way, clipped to the topic's ends
WALK_P = 0.4
_WALK_MAX = 40  # offsets past this carry < 1e-8 of the mass


def next_item_probability(shape: Shape, w: World, user: int, last_item: int) -> np.ndarray:
    """(n_items,) the generator's probability that ``user``'s next step draws each item, given the
    item drawn before it (generator numbers: item id - 1). Items the user already has are redrawn by
    the generator, so among the items not seen yet the ranking by this is the best any model can do:
    the ceiling of seen-masked HR@K on this shape."""
    t_w = np.zeros(shape.n_topics)
    np.add.at(t_w, w.user_topics[user], w.weights[user])
    topic_total = np.bincount(w.topic, weights=w.pop, minlength=shape.n_topics)
    p = (1.0 - shape.noise - shape.p_next) * t_w[w.topic] * w.pop / topic_total[w.topic]
    p += shape.noise * w.pop / w.pop.sum()
    t = w.topic[last_item]
    lo, hi = w.starts[t], w.starts[t] + w.sizes[t] - 1
    for off in range(1, _WALK_MAX + 1):
        mass = shape.p_next * WALK_P * (1.0 - WALK_P) ** (off - 1) / 2.0  # each direction
        for sign in (-1, 1):
            p[w.order[np.clip(w.slot[last_item] + sign * off, lo, hi)]] += mass
    return p


def generate(shape: Shape, truth: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(interactions, items) frames for ``shape``; the same shape gives the same rows, bit for bit.

    ``truth``: also what the generator knows and a model has to discover (not written to the
    benchmark's files): each interaction's "kind" (KIND_TOPIC: a pick from one of the user's topics,
    KIND_NOISE: a popular item from anywhere, KIND_NEXT: a neighbour of the previous item) and each
    item's "topic"."""
    rng = np.random.default_rng(shape.seed)
    n_items, n_topics = shape.n_items, shape.n_topics
    w = _draw_world(shape, rng)
    topic, pop, order, slot, starts, sizes = w.topic, w.pop, w.order, w.slot, w.starts, w.sizes
    user_topics, weights = w.user_topics, w.weights
    # popularity-weighted draws inside a topic: one cumulative array, topic t spans (t, t + 1]
    csum = np.cumsum(pop[order])
    before = np.concatenate([[0.0], csum])[starts][topic[order]]
    total = csum[starts + sizes - 1][topic[order]] - before
    cdf = topic[order] + (csum - before) / total
    cdf[starts + sizes - 1] = np.arange(n_topics) + 1.0
    global_cdf = np.cumsum(pop) / pop.sum()

    def in_topic(t: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(cdf, t + rng.random(len(t)), side="right")
        return order[np.minimum(pos, starts[t] + sizes[t] - 1)]

    n_users = shape.n_users
    sigma = 0.6
    length = np.round(shape.mean_len * np.exp(rng.normal(-sigma * sigma / 2, sigma, n_users)))
    length = np.clip(length, shape.min_len, n_items // 4).astype(np.int64)
    steps = int(length.max() * 1.3) + 2  # room for repeats, which are dropped below

    users, items, kinds = [], [], []
    prev = np.full(n_users, -1, dtype=np.int64)
    for _ in range(steps):
        r = rng.random(n_users)
        pick_topic = user_topics[np.arange(n_users), (rng.random((n_users, 1)) > weights.cumsum(axis=1)).sum(axis=1)]
        cur = in_topic(pick_topic)
        noisy = r < shape.noise
        cur[noisy] = np.minimum(np.searchsorted(global_cdf, rng.random(int(noisy.sum()))), n_items - 1)
        step = (r >= shape.noise) & (r < shape.noise + shape.p_next) & (prev >= 0)
        if step.any():
            p = prev[step]
            t = topic[p]
            off = rng.geometric(WALK_P, int(step.sum())) * rng.choice([-1, 1], int(step.sum()))
            s = np.clip(slot[p] + off, starts[t], starts[t] + sizes[t] - 1)
            cur[step] = order[s]
        users.append(np.arange(n_users))
        items.append(cur)
        kinds.append(np.where(step, KIND_NEXT, np.where(noisy, KIND_NOISE, KIND_TOPIC)))
        prev = cur
    u = np.stack(users, axis=1).ravel()  # (U * steps,) user-major, step order kept
    it = np.stack(items, axis=1).ravel()
    kind = np.stack(kinds, axis=1).ravel()
    # first occurrence of each (user, item), then the first ``length`` of them per user
    _, first = np.unique(u * n_items + it, return_index=True)
    first.sort()
    u, it, kind = u[first], it[first], kind[first]
    rank = np.arange(len(u)) - np.searchsorted(u, u, side="left")
    keep = rank < length[u]
    u, it, kind = u[keep], it[keep], kind[keep]
    gap = 1 + rng.exponential(3 * 3600.0, len(u)).astype(np.int64)
    csum_gap = np.cumsum(gap)
    first_of = np.searchsorted(u, u, side="left")
    ts = 1_600_000_000 + rng.integers(0, 365 * 86_400, n_users)[u] + csum_gap - np.where(
        first_of > 0, csum_gap[np.maximum(first_of - 1, 0)], 0)
    inter = pd.DataFrame({"user_id": [f"u{x}" for x in u], "item_id": it + 1, "timestamp": ts})
    if truth:
        inter["kind"] = kind
    inter = inter.sort_values("timestamp", kind="stable").reset_index(drop=True)
    category = np.where(rng.random(n_items) < 0.8, topic, rng.integers(0, n_topics, n_items))
    price_level = np.exp(rng.normal(3.0, 0.7, n_topics))
    price = np.round(price_level[topic] * np.exp(rng.normal(0.0, 0.4, n_items)), 2)
    items_df = pd.DataFrame({"item_id": np.arange(1, n_items + 1), "category": [f"c{c:02d}" for c in category],
                             "price": price})
    if truth:
        items_df["topic"] = topic
    return inter, items_df


def ensure(name: str) -> str:
    """The data spec of benchmark dataset ``name``, writing a synthetic shape's files if missing."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if name in SHAPES:
        d = DATA_ROOT / name
        stamp = d / "shape.txt"
        want = repr(asdict(SHAPES[name]))
        if not (stamp.is_file() and stamp.read_text() == want):
            d.mkdir(parents=True, exist_ok=True)
            inter, items = generate(SHAPES[name])
            inter.to_csv(d / "interactions.csv", index=False)
            items.to_csv(d / "items.csv", index=False)
            stamp.write_text(want)
    return DATASETS[name]


def describe(spec: str) -> dict[str, float]:
    """Shape statistics of a dataset as the trainer sees it."""
    sys.path.insert(0, str(REPO))
    from training.data import load_data

    d = load_data(spec)
    per_user = d.interactions.groupby("user_id").size()
    per_item = d.interactions.groupby("item_id").size().reindex(d.items.index, fill_value=0)
    return {"users": len(d.users), "items": len(d.items), "interactions": len(d.interactions),
            "median_history": float(per_user.median()), "mean_history": float(per_user.mean()),
            "density": len(d.interactions) / (len(d.users) * len(d.items)),
            "items_le_5": float((per_item <= 5).mean()), "items_0": float((per_item == 0).mean())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated dataset names")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(DATASETS)
    for n in names:
        stats = describe(ensure(n))
        print(n, " ".join(f"{k}={v:.4g}" for k, v in stats.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
