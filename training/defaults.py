"""Settings derived from the data at train time, for the knobs whose right value depends on it.

A user's data is rarely shaped like the benchmark's: histories of 5 items or of 500, catalogues of
2,000 items or of 200,000, most of them seen once or seen by everyone. A knob left unset (``None``
in ``TrainConfig``) is derived here from a few statistics of the training interactions; a value
the user gave always wins. Every derived value is logged with the reason, and the training job
records them in the model's ``config.json`` and ``metrics.json`` under ``derived``.

The rules (each checked on the quality benchmark's four datasets, BENCHMARKS.md):

- ``history_len``: the 90th percentile of the users' history lengths, within [5, 50]. The
  attention and recency encoders learn how much older items count, so a window that covers most
  users' whole history costs little where the recent items matter most and helps where the whole
  history does (EASE reads it all).
- ``epochs``: about ``EXAMPLES_BUDGET`` training examples in all (at least 3, at most 12 epochs).
  Small data needs several passes for its many rarely seen ids; large data learns enough from
  fewer passes, and the 60 s budget holds either way.
- ``use_user_id``: on when the median user has at least ``USER_ID_MIN_HISTORY`` training rows. A
  user embedding learned from a handful of examples is noise the model fits (short session-like
  histories, ~3 rows: -0.02 HR@50 with it; the long-tail set, ~15 rows: -0.005), while with the
  60+ rows of a MovieLens user it carries taste the history window does not (+0.04 on ML-100k).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

HISTORY_LEN_RANGE = (5, 50)
HISTORY_QUANTILE = 0.9
EXAMPLES_BUDGET = 600_000
EPOCHS_RANGE = (3, 12)
USER_ID_MIN_HISTORY = 30

# the TrainConfig fields a None value asks to derive
DERIVED_FIELDS = ("history_len", "epochs", "use_user_id")


@dataclass(frozen=True)
class DataStats:
    """What the rules read: sizes and the distribution of per-user history lengths."""

    n_users: int
    n_items: int
    n_interactions: int
    n_examples: int                   # training examples (one per train interaction)
    history_quantiles: dict[str, float]  # "p50", "p75", "p90" of interactions per user (train split)

    @classmethod
    def of(cls, train_user_ids: Any, n_items: int, n_interactions: int) -> DataStats:
        """From the train split's user ids (one per example) and the catalogue size."""
        import pandas as pd

        per_user = pd.Series(np.asarray(train_user_ids)).value_counts().to_numpy()
        q = {f"p{int(p * 100)}": float(np.quantile(per_user, p)) if len(per_user) else 0.0
             for p in (0.5, 0.75, 0.9)}
        return cls(n_users=int(len(per_user)), n_items=int(n_items), n_interactions=int(n_interactions),
                   n_examples=int(len(train_user_ids)), history_quantiles=q)

    @classmethod
    def from_counts(cls, per_user: Any, n_items: int, n_interactions: int) -> DataStats:
        """From each user's number of TRAIN rows (the streamed path counts them shard by shard)."""
        per_user = np.asarray(per_user, dtype=np.int64)
        q = {f"p{int(p * 100)}": float(np.quantile(per_user, p)) if len(per_user) else 0.0
             for p in (0.5, 0.75, 0.9)}
        return cls(n_users=int(len(per_user)), n_items=int(n_items), n_interactions=int(n_interactions),
                   n_examples=int(per_user.sum()), history_quantiles=q)

    def to_dict(self) -> dict[str, Any]:
        return {"users": self.n_users, "items": self.n_items, "interactions": self.n_interactions,
                "examples": self.n_examples, "history_length": dict(self.history_quantiles)}


def _clip(v: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, v)))


def derive(cfg: Any, stats: DataStats | Callable[[], DataStats]) -> tuple[Any, dict[str, dict[str, Any]]]:
    """``cfg`` with every unset (None) derivable field filled in, and {field: {value, why}}.

    ``stats`` may be a function: it is called only when something is left to derive."""
    if all(getattr(cfg, f, 0) is not None for f in DERIVED_FIELDS):
        return cfg, {}
    if callable(stats):
        stats = stats()
    chosen: dict[str, dict[str, Any]] = {}
    if getattr(cfg, "history_len", 0) is None:
        p90 = stats.history_quantiles["p90"]
        v = _clip(math.ceil(p90), *HISTORY_LEN_RANGE)
        chosen["history_len"] = {"value": v, "why": f"90th percentile of users' history lengths is {p90:g}, "
                                                    f"kept within {list(HISTORY_LEN_RANGE)}"}
    if getattr(cfg, "epochs", 0) is None:
        raw = EXAMPLES_BUDGET / max(1, stats.n_examples)
        v = _clip(round(raw), *EPOCHS_RANGE)
        chosen["epochs"] = {"value": v, "why": f"{stats.n_examples:,} training examples: about "
                                               f"{EXAMPLES_BUDGET:,} examples in all, within {list(EPOCHS_RANGE)} epochs"}
    if getattr(cfg, "use_user_id", False) is None:
        p50 = stats.history_quantiles["p50"]
        on = p50 >= USER_ID_MIN_HISTORY
        chosen["use_user_id"] = {"value": on, "why": f"the median user has {p50:g} training rows "
                                                     f"({'>=' if on else '<'} {USER_ID_MIN_HISTORY})"}
    if not chosen:
        return cfg, {}
    for name, c in chosen.items():
        log.info("derived %s = %s (%s; set it explicitly to override)", name, c["value"], c["why"])
    return type(cfg).from_dict({**cfg.to_dict(), **{k: c["value"] for k, c in chosen.items()}}), chosen


