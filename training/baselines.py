"""Reference recommenders scored by the same evaluator as the towers: popularity and EASE.

- Popularity: every user gets the catalogue ranked by how often each item occurs in the TRAIN split.
- EASE (Steck, "Embarrassingly Shallow Autoencoders", WWW 2019): an item-item weight matrix B with
  a zero diagonal, fitted in closed form on the binary train user-item matrix X:
      P = (X^T X + lambda I)^-1,   B = -P / diag(P) (column-wise),   diag(B) = 0
  A user's scores are (history row) @ B. It is a strong, training-free reference on MovieLens;
  memory is O(N_items^2), fine for catalogues of a few tens of thousands of items.
Both produce scorers in the evaluator's convention: ``users (B,) -> scores (B, N_items)``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from training.evaluate import EvalSet, ScoreFn

log = logging.getLogger(__name__)

DEFAULT_EASE_LAMBDA = 500.0


def _item_columns(train: pd.DataFrame, item_ids: Sequence[Any] | np.ndarray) -> np.ndarray:
    cols = pd.Index(np.asarray(item_ids)).get_indexer(train["item_id"])
    n_unknown = int((cols < 0).sum())
    if n_unknown:
        log.warning("%d train rows name items outside the catalogue; ignored", n_unknown)
    return cols


def item_counts(train: pd.DataFrame, item_ids: Sequence[Any] | np.ndarray) -> np.ndarray:
    """(N,) number of train interactions per catalogue item (0 for items never seen)."""
    cols = _item_columns(train, item_ids)
    return np.bincount(cols[cols >= 0], minlength=len(item_ids)).astype(np.float64)


def popularity_scorer(train: pd.DataFrame, ev: EvalSet) -> ScoreFn:
    """Same ranking for everyone: train-split interaction counts (ties: catalogue order)."""
    counts = item_counts(train, ev.item_ids).astype(np.float32)  # (N,)

    def score(users: np.ndarray) -> np.ndarray:
        return np.broadcast_to(counts, (len(users), len(counts)))  # (B, N)

    return score


def interaction_matrix(train: pd.DataFrame, item_ids: Sequence[Any] | np.ndarray,
                       dtype: Any = np.float64) -> np.ndarray:
    """Binary (U_train, N) matrix over every user in the train split (repeats count once)."""
    cols = _item_columns(train, item_ids)
    users = pd.Index(pd.unique(train["user_id"].astype(str)))
    rows = users.get_indexer(train["user_id"].astype(str))
    keep = cols >= 0
    X = np.zeros((len(users), len(item_ids)), dtype=dtype)
    X[rows[keep], cols[keep]] = 1
    return X


def ease_dtype(n_items: int) -> Any:
    """The dtype to fit EASE in: float64, or float32 above 10,000 items, where the inverse of a
    20,000 x 20,000 Gram matrix in float64 alone would take 3.2 GB."""
    return np.float64 if n_items <= 10_000 else np.float32


def fit_ease(train: pd.DataFrame, item_ids: Sequence[Any] | np.ndarray, lam: float = DEFAULT_EASE_LAMBDA,
             dtype: Any = np.float64) -> np.ndarray:
    """Closed-form EASE weights (N, N) with a zero diagonal, from the binary train matrix.

    The Gram matrix and its inverse are computed in ``dtype`` (float64 by default: the inverse of a
    regularised Gram matrix is well conditioned, but float64 keeps results reproducible to many digits).
    """
    if lam <= 0:
        raise ValueError(f"EASE lambda must be > 0, got {lam}")
    X = interaction_matrix(train, item_ids, dtype=dtype)  # (U, N)
    # Items no train row names have a zero column: their Gram row is lam on the diagonal alone, so
    # their B row and column are exactly 0. Inverting only the active block gives the same B at
    # a fraction of the cost on long-tail catalogues (the inverse is cubic in the items).
    active = np.flatnonzero(X.any(axis=0))
    Xa = X[:, active]
    del X
    G = Xa.T @ Xa  # (A, A) item co-occurrence counts
    G[np.diag_indices_from(G)] += lam
    P = np.linalg.inv(G)
    Ba = P / (-np.diag(P))[None, :]  # B_ij = -P_ij / P_jj
    Ba[np.diag_indices_from(Ba)] = 0.0
    if len(active) == len(item_ids):
        return Ba
    B = np.zeros((len(item_ids), len(item_ids)), dtype=Ba.dtype)
    B[np.ix_(active, active)] = Ba
    return B


def ease_scorer(B: np.ndarray, ev: EvalSet) -> ScoreFn:
    """Scores = binary history-before-the-target row @ B."""
    W = np.asarray(B)
    if W.shape != (ev.n_items, ev.n_items):
        raise ValueError(f"EASE weights have shape {W.shape}, catalogue has {ev.n_items} items")

    def score(users: np.ndarray) -> np.ndarray:
        return ev.history_matrix(users, dtype=W.dtype) @ W  # (B, N) @ (N, N) -> (B, N)

    return score
