"""Data loading for the training job: synthetic, MovieLens (100k / 1M) and CSV/Parquet.

CONTRACT (other modules rely on exactly this):

    load_data(spec: str, **size_options) -> RecData
        spec is "synthetic", "movielens:DIR" or "csv:DIR".
    split_leave_last_out(data: RecData) -> Split

RecData.interactions: DataFrame with columns
    user_id (str), item_id (catalogue type: int64 or str), timestamp (int64), weight (float64)
RecData.users: DataFrame indexed by user_id (str) with feature columns typed per towers.schema
RecData.items: DataFrame indexed by item_id, one row for EVERY item of the catalogue (also items with
    no interactions), feature columns typed per towers.schema
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from towers.schema import FeatureSpec


@dataclass
class RecData:
    name: str
    interactions: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    user_features: list[FeatureSpec]
    item_features: list[FeatureSpec]
    # synthetic data only: {"user_cluster": {user_id: c}, "item_cluster": {item_id: c}}
    truth: dict[str, dict[Any, int]] | None = None
    # reason -> number of rows dropped while loading (each reason is also logged)
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass
class Split:
    """Per-user temporal leave-last-out. valid/test hold one row per eligible user."""

    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
