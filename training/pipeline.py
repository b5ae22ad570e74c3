"""Training examples and the batches each rank trains on.

An example is a YoutubeDNN-style next-item prediction: for every training interaction of a user (in
time order) the user tower reads the items the user had BEFORE it (the last ``history_len``) and
the label is the item. ``examples_from_rows`` builds them, vectorised, from interaction rows that
hold whole users (every row of each user present), which is what both sources give it:

- ``MemoryBatches``: data held in memory (MovieLens, CSV, synthetic presets); the examples are
  built once and split between ranks by user;
- ``ShardBatches`` (training/stream.py): data larger than memory, read back one shard of users
  at a time.

Both are ``torch.utils.data.IterableDataset``s of ready batches, read through a ``DataLoader``.
Every rank yields the same number of equally sized batches per epoch (collectives need the same
shapes everywhere): a rank with fewer examples wraps around its own. The order is a function of
(seed, epoch, rank) only, so a resumed run replays exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

log = logging.getLogger(__name__)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class Examples:
    """Next-item training examples in (user, time) order."""

    user_rows: np.ndarray   # (N,) int64
    item_rows: np.ndarray   # (N,) int64, the label
    hist: np.ndarray        # (N, L) int64 item rows before the label, oldest first, 0-padded right
    weights: np.ndarray     # (N,) float32

    def __len__(self) -> int:
        return len(self.item_rows)


def epoch_seed(seed: int, epoch: int, stream: int, rank: int = 0) -> int:
    """One independent, reproducible random stream per (seed, epoch, purpose, rank)."""
    return int(np.random.SeedSequence([seed, epoch, stream, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def part_of(user_rows: np.ndarray, parts: int) -> np.ndarray:
    """Which of ``parts`` partitions each user row falls in: a multiplicative hash, so that users with
    neighbouring rows (ids sorted by sign-up time, say) spread evenly."""
    if parts <= 1:
        return np.zeros(len(user_rows), dtype=np.int64)
    h = (np.asarray(user_rows, dtype=np.uint64) * _GOLDEN) >> np.uint64(33)
    return (h % np.uint64(parts)).astype(np.int64)


def examples_from_rows(user_rows: np.ndarray, item_rows: np.ndarray, timestamps: np.ndarray,
                       weights: np.ndarray | None, history_len: int) -> Examples:
    """Examples from interaction rows (row numbers >= 1), every row of each user present.

    Rows are ordered per user by (timestamp, position in the input): the input's order breaks ties,
    the same rule as the split and the evaluator.
    """
    u = np.asarray(user_rows, dtype=np.int64)
    it = np.asarray(item_rows, dtype=np.int64)
    n = len(u)
    w = np.ones(n, dtype=np.float64) if weights is None else np.asarray(weights, dtype=np.float64)
    order = np.lexsort((np.arange(n), np.asarray(timestamps, dtype=np.int64), u))
    u, it, w = u[order], it[order], w[order]
    first = np.searchsorted(u, u, side="left")  # index of each row's user's first example
    pos = np.arange(n) - first  # how many earlier interactions this user has
    k = np.minimum(pos, history_len)  # (N,) history length actually available
    j = np.arange(history_len)[None, :]  # (1, L)
    src = np.arange(n)[:, None] - k[:, None] + j  # (N, L) rows of the last k items before each label
    valid = j < k[:, None]
    hist = np.where(valid, it[np.clip(src, 0, max(n - 1, 0))], 0).astype(np.int64)
    return Examples(user_rows=u, item_rows=it, hist=hist, weights=w.astype(np.float32))


def _rows_for(index: pd.Index, values: pd.Series | np.ndarray) -> np.ndarray:
    """Row r >= 1 of each value in ``index`` (catalogue/user order), 0 when unknown."""
    return (index.get_indexer(values) + 1).astype(np.int64)


def build_examples(train: pd.DataFrame, user_index: pd.Index, item_index: pd.Index, history_len: int) -> Examples:
    """Examples from a train split held as a DataFrame (ids looked up in the encoder's order)."""
    user_rows = _rows_for(user_index, train["user_id"].astype(str).to_numpy(dtype=object))
    item_rows = _rows_for(item_index, train["item_id"].to_numpy())
    keep = (user_rows > 0) & (item_rows > 0)
    if not keep.all():
        log.warning("%d training rows name users or items outside the tables; skipped", int((~keep).sum()))
    w = train["weight"].to_numpy(dtype=np.float64)[keep] if "weight" in train else None
    return examples_from_rows(user_rows[keep], item_rows[keep], train["timestamp"].to_numpy(dtype=np.int64)[keep],
                              w, history_len)


def batch_tensors(ex: Examples, idx: np.ndarray) -> dict[str, torch.Tensor]:
    """One batch: user rows (b,), histories (b, L), labels (b,), weights (b,)."""
    return {"user_row": torch.from_numpy(ex.user_rows[idx]), "hist": torch.from_numpy(ex.hist[idx]),
            "item_row": torch.from_numpy(ex.item_rows[idx]), "weight": torch.from_numpy(ex.weights[idx])}


def lap_order(n: int, seed: int, epoch: int, rank: int, lap: int) -> np.ndarray:
    """A shuffled order of ``n`` positions: a function of (seed, epoch, rank, lap) only."""
    return np.random.default_rng(epoch_seed(seed, epoch, 0, rank * 1_000_003 + lap)).permutation(n)


class EpochBatches(torch.utils.data.IterableDataset):
    """Batches of one rank for one epoch; the training loop takes ``steps`` of them.

    ``full_batches`` (several ranks): every batch has exactly ``batch`` rows and the stream goes on
    past the end of the rank's examples (the next lap, reshuffled), so a rank with fewer examples
    wraps around its own. Otherwise (one rank) it is a single lap whose last batch may be short:
    every example exactly once per epoch.
    """

    def __init__(self, *, batch: int, seed: int, rank: int, full_batches: bool) -> None:
        super().__init__()
        self.batch, self.seed, self.rank, self.full_batches = batch, seed, rank, full_batches
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def laps(self, lap: int) -> Any:
        """The example blocks of one lap, each an ``Examples`` already in its training order."""
        raise NotImplementedError

    @staticmethod
    def worker_share() -> tuple[int, int]:
        """(this DataLoader worker, workers): with several, each builds batches from its share."""
        info = torch.utils.data.get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def __iter__(self) -> Any:
        carry: Examples | None = None
        lap = 0
        while True:
            for block in self.laps(lap):
                if carry is not None and len(carry):
                    block = concat_examples([carry, block])
                n = len(block)
                full = n // self.batch * self.batch
                for s in range(0, full, self.batch):
                    yield batch_tensors(block, np.arange(s, s + self.batch))
                carry = take(block, np.arange(full, n))
            lap += 1
            if not self.full_batches:
                if carry is not None and len(carry):
                    yield batch_tensors(carry, np.arange(len(carry)))
                return


class MemoryBatches(EpochBatches):
    """This rank's share of in-memory examples (the examples of its users)."""

    def __init__(self, ex: Examples, rows: np.ndarray, **kw: Any) -> None:
        super().__init__(**kw)
        self.ex, self.rows = ex, np.asarray(rows, dtype=np.int64)

    def laps(self, lap: int) -> Any:
        w, k = self.worker_share()
        if len(self.rows):
            yield take(self.ex, self.rows[lap_order(len(self.rows), self.seed, self.epoch, self.rank, lap)][w::k])


def take(ex: Examples, idx: np.ndarray) -> Examples:
    return Examples(ex.user_rows[idx], ex.item_rows[idx], ex.hist[idx], ex.weights[idx])


def concat_examples(parts: list[Examples]) -> Examples:
    return Examples(*(np.concatenate([getattr(p, f) for p in parts])
                      for f in ("user_rows", "item_rows", "hist", "weights")))


def loader(dataset: torch.utils.data.IterableDataset, workers: int = 0) -> torch.utils.data.DataLoader:
    """Batches come ready-made from the dataset (batch_size=None); a worker process builds them
    ahead of the training step when ``workers`` > 0."""
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
