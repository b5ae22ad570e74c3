"""Settings derived from the data: the rules, explicit values winning, and the record of each choice."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from training.config import TrainConfig
from training.defaults import DERIVED_FIELDS, DataStats, derive


def _stats(history_lengths: list[int], n_items: int = 1000) -> DataStats:
    users = np.repeat(np.arange(len(history_lengths)), history_lengths)
    return DataStats.of(users, n_items=n_items, n_interactions=int(sum(history_lengths)))


def test_stats_read_the_history_length_distribution() -> None:
    s = _stats([2] * 40 + [10] * 50 + [200] * 10)
    assert (s.n_users, s.n_examples, s.n_items) == (100, 2580, 1000)
    assert s.history_quantiles["p50"] == 10 and s.history_quantiles["p90"] == pytest.approx(29, abs=1)


def test_unset_fields_are_derived_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    cfg = TrainConfig()
    assert all(getattr(cfg, f) is None for f in DERIVED_FIELDS)  # the shipped defaults derive these
    with caplog.at_level(logging.INFO, logger="training.defaults"):
        out, chosen = derive(cfg, _stats([3] * 900 + [4] * 100))
    assert set(chosen) == set(DERIVED_FIELDS)
    for name, c in chosen.items():
        assert getattr(out, name) == c["value"] and c["why"]
        assert f"derived {name} = {c['value']}" in caplog.text
    assert cfg.history_len is None  # the caller's config is not changed in place


def test_history_length_follows_the_users_histories() -> None:
    short = derive(TrainConfig(), _stats([3] * 1000))[0].history_len
    long = derive(TrainConfig(), _stats([300] * 1000))[0].history_len
    mid = derive(TrainConfig(), _stats([12] * 1000))[0].history_len
    assert short < mid < long


def test_epochs_shrink_as_the_data_grows() -> None:
    small = derive(TrainConfig(), _stats([20] * 1000))[0].epochs
    big = derive(TrainConfig(), _stats([50] * 40_000))[0].epochs
    assert small > big >= 1


def test_explicit_values_always_win() -> None:
    explicit = {f: (7 if f != "use_user_id" else True) for f in DERIVED_FIELDS}
    cfg = TrainConfig(**explicit)
    out, chosen = derive(cfg, _stats([3] * 1000))
    assert chosen == {} and all(getattr(out, f) == v for f, v in explicit.items())


def test_the_training_job_records_what_it_derived_and_why(tmp_path) -> None:
    import json

    from training.train import run

    res = run(TrainConfig(data="synthetic", data_options={"size": "tiny"}, dim=8, hidden=(16,), num_threads=1,
                          artifacts=str(tmp_path), quiet=True, history_len=4, patience=1))
    doc = json.loads((res.dir / "config.json").read_text())
    derived = doc["derived"]
    assert set(derived) == {"epochs", "use_user_id"}  # history_len was given: not derived
    assert doc["train"]["history_len"] == 4 and doc["tower"]["history_len"] == 4
    for name, c in derived.items():
        assert doc["train"][name] == c["value"] and c["why"]
    assert json.loads((res.dir / "metrics.json").read_text())["derived"] == derived
