"""The user's last item's neighbours: a second source of candidates beside the towers.

Items users take one right after the other (the next episode, an accessory, a sequel) are related in
a way a dot product of two 64-d vectors holds badly: a long chain of such items needs about as many
dimensions as it has links. A plain count from the data does hold it. So a recall adds to each
candidate's tower score

    weight * n(last, item) / sqrt(T(last) * T(item))

where n counts how often the item sat right before or right after the user's last item in anyone's
history (each item keeps its ``top`` most frequent neighbours) and T(x) is x's total over the
neighbours it kept: the cosine of the two items as 0/1 vectors over the adjacent pairs each took part
in (Ochiai's coefficient), so a popular item's many pairs each weigh less, on either side. Training
picks ``weight`` on the validation split, 0 leaving the towers' ranking alone (``training.blend``);
the reindex job counts the pairs from the interactions it publishes (``index.reindex``); the service
(``service.pipeline``) and the offline evaluation (``training.evaluate``) both score with
``Neighbours.bonus``, so an answer over HTTP ranks as the evaluation ranked.

Measured on the same trained towers, test HR@50 with the weight chosen on validation each time:
the cosine against the raw log(1 + n) gained +0.0053 on synthetic-longtail (3.8 standard errors of
the per-user difference) and +0.0039 on synthetic-short (5.6); normalising by the last item alone
(n / sqrt(T(last))) gained about half of that. On the MovieLens sets no weight beats the towers
alone either way. Also counting pairs one item apart (at 0.1 x) was measured and left out:
synthetic-longtail test HR@50 0.412 against 0.427 with adjacent pairs alone, synthetic-short 0.537
against 0.530.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_TOP = 32  # neighbours kept per item
META_KEY = "neighbour_weight"  # the checkpoint meta's key for the weight (absent or 0: the towers alone)
# the bonus a weight was chosen for, kept beside it (checkpoint meta, bundle manifest): a weight that
# was chosen for another bonus (before the cosine: log(1 + n), untagged) means nothing for this one
SCORE = "cosine"
SCORE_KEY = "neighbour_score"
UNTAGGED = "log(1 + n)"  # what an untagged weight was chosen for


def set_weight(meta: MutableMapping[str, Any], weight: float) -> None:
    """Record ``weight`` in a checkpoint's ``meta``, tagged with this module's bonus; 0 removes it."""
    meta.pop(META_KEY, None)
    meta.pop(SCORE_KEY, None)
    if weight > 0:
        meta[META_KEY], meta[SCORE_KEY] = float(weight), SCORE


def weight_of(meta: Mapping[str, Any], where: str = "model") -> float:
    """The weight a checkpoint's meta or a bundle's manifest (``META_KEY``, ``SCORE_KEY``) carries for
    this module's bonus: 0 without one, and 0 (with a warning) for a weight chosen for another bonus:
    the towers alone until the model is retrained and reindexed."""
    weight = float(meta.get(META_KEY) or 0.0)
    if weight > 0 and meta.get(SCORE_KEY) != SCORE:
        log.warning("%s: its neighbour weight %g was chosen for the %s bonus, not the %s one; recall uses "
                    "the towers alone until the model is retrained and reindexed", where, weight,
                    meta.get(SCORE_KEY) or UNTAGGED, SCORE)
        return 0.0
    return weight


def consecutive_pairs(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray | None = None,
                      missing: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """(earlier, later) items of every pair one user had one right after the other.

    Each user's rows are read in time order, ties in the input's order (a stable sort by user, then
    timestamp); pairs never cross two users. A pair with a ``missing`` item (an id outside the
    catalogue) or an item followed by itself is dropped.
    """
    users, items = np.asarray(users), np.asarray(items, dtype=np.int64)
    if len(items) < 2:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    order = (np.lexsort((np.asarray(timestamps), users)) if timestamps is not None
             else np.argsort(users, kind="stable"))
    u, it = users[order], items[order]
    same_user = u[1:] == u[:-1]
    src, dst = it[:-1][same_user], it[1:][same_user]
    keep = (src != missing) & (dst != missing) & (src != dst)
    return src[keep], dst[keep]


@dataclass(frozen=True)
class Neighbours:
    """Each item's most frequent neighbours, CSR over item positions (catalogue rows 0..N-1)."""

    indptr: np.ndarray  # (N + 1,) int64
    cols: np.ndarray  # (nnz,) int64 neighbour positions, most frequent first
    counts: np.ndarray  # (nnz,) float32 pair counts, either direction
    totals: np.ndarray = field(init=False, repr=False, compare=False)  # (N,) each row's kept count

    def __post_init__(self) -> None:
        # one sum per non-empty row (their starts rise strictly, each segment ending at the next start);
        # a row-number array per entry would take 8 bytes x nnz (256 MB at 1M items x 32) at every load
        totals = np.zeros(len(self.indptr) - 1)
        full = self.indptr[:-1] < self.indptr[1:]
        if full.any():
            totals[full] = np.add.reduceat(self.counts, self.indptr[:-1][full], dtype=np.float64)
        object.__setattr__(self, "totals", totals)

    @property
    def n_items(self) -> int:
        return len(self.indptr) - 1

    @classmethod
    def from_pairs(cls, src: np.ndarray, dst: np.ndarray, n_items: int, top: int = DEFAULT_TOP) -> Neighbours:
        """Count the pairs in both directions and keep each item's ``top`` most frequent neighbours
        (ties: the lower position)."""
        if top < 1:
            raise ValueError(f"top must be >= 1, got {top}")
        a = np.concatenate([src, dst]).astype(np.int64)
        b = np.concatenate([dst, src]).astype(np.int64)
        if len(a) and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= n_items):
            raise ValueError(f"pair positions must lie in [0, {n_items})")
        keys, counts = np.unique(a * n_items + b, return_counts=True)
        rows, cols = keys // n_items, keys % n_items
        order = np.lexsort((cols, -counts, rows))  # by row, most frequent first
        rows, cols, counts = rows[order], cols[order], counts[order]
        first = np.searchsorted(rows, rows, side="left")  # each entry's row start
        keep = np.arange(len(rows)) - first < top
        rows, cols, counts = rows[keep], cols[keep], counts[keep]
        indptr = np.zeros(n_items + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n_items), out=indptr[1:])
        return cls(indptr, cols.astype(np.int64), counts.astype(np.float32))

    def bonus(self, last: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query, item, cosine), each (nnz,), for the queries' last items ``last`` (B,) given as
        positions, -1 for a query without one: n(last, item) / sqrt(T(last) T(item)), in (0, 1].
        Items with n = 0 are left out."""
        last = np.asarray(last, dtype=np.int64)
        q = np.flatnonzero(last >= 0)
        starts, ends = self.indptr[last[q]], self.indptr[last[q] + 1]
        lens = ends - starts
        # positions start..end-1 of every query's item, flattened: a ragged arange
        at = np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(int(lens.sum()))
        qq, cols = np.repeat(q, lens), self.cols[at]
        # T(last) >= n (the pair is in last's row) and T(item) >= n (counts go both ways: item's row
        # holds the pair, or, cut at ``top``, pairs at least as frequent), so the cosine is at most 1;
        # the maximum only keeps a zero total out of the division
        norm = np.sqrt(self.totals[last[qq]] * np.maximum(self.totals[cols], self.counts[at]))
        return qq, cols, (self.counts[at] / norm).astype(np.float32)

    def save(self, path: str | Path) -> None:
        with open(path, "wb") as f:
            np.savez(f, indptr=self.indptr, cols=self.cols, counts=self.counts)

    @classmethod
    def load(cls, path: str | Path, n_items: int | None = None) -> Neighbours:
        """Read a table ``save`` wrote; ValueError when it is inconsistent (or not over ``n_items``)."""
        with np.load(path, allow_pickle=False) as z:
            indptr, cols, counts = z["indptr"].astype(np.int64), z["cols"].astype(np.int64), z["counts"].astype(np.float32)
        n = len(indptr) - 1
        # checked before the table is built (its row totals read every row)
        bad = (n < 0 or indptr[0] != 0 or indptr[-1] != len(cols) or len(cols) != len(counts)
               or bool(np.any(np.diff(indptr) < 0))
               or (len(cols) > 0 and (cols.min() < 0 or cols.max() >= n))
               or not bool(np.isfinite(counts).all()) or bool(np.any(counts < 0)))
        if bad:
            raise ValueError(f"{path}: not a consistent neighbour table")
        if n_items is not None and n != n_items:
            raise ValueError(f"{path}: a table over {n} items for a catalogue of {n_items}")
        return cls(indptr, cols, counts)
