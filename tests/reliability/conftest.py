"""Fixtures of the reliability tests: artifacts from a real (tiny) training run and reindex, a private
redis-server, and real servers; every process is stopped in the fixture's teardown."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.harness import RedisProc, ServerProc

ADMIN_TOKEN = "rel-admin-token-7f3a"
N_USERS = 200  # the "tiny" synthetic preset: users "1".."200", items 1..120
N_ITEMS = 120


@dataclass
class Trained:
    path: Path
    model_a: str  # the model the first bundle was built from
    model_b: str  # a second model version (another seed): models/LATEST names it
    first_bundle: str


def train_tiny(artifacts: Path, seed: int, epochs: int = 1, **kw: Any) -> Any:
    from training.config import TrainConfig
    from training.train import run

    cfg = TrainConfig(data="synthetic", data_options={"size": "tiny", "seed": 0}, artifacts=str(artifacts),
                      dim=16, hidden=(32,), history_len=10, epochs=epochs, batch_size=256, num_negatives=64,
                      hard_negatives=8, seed=seed, quiet=True, num_threads=1,
                      # sharp logits: two seeds give models that answer differently, which the hot-swap
                      # checks need to tell which bundle answered (at the default 0.12 they overlapped 0.82)
                      **{"temperature": 0.05, **kw})
    return run(cfg)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """Two model versions trained on tiny synthetic data and one published bundle (model A)."""
    from index.reindex import ReindexConfig
    from index.reindex import run as reindex

    art = tmp_path_factory.mktemp("rel-artifacts")
    a = train_tiny(art, seed=0)
    b = train_tiny(art, seed=1)
    m = reindex(ReindexConfig(artifacts=art, model_version=a.model_version, threads=1, n_eval_users=100))
    return Trained(art, a.model_version, b.model_version, m.index_version)


@pytest.fixture
def artifacts(trained: Trained, tmp_path: Path) -> Path:
    """A private copy of the trained artifacts (tests publish into it and corrupt it)."""
    dst = tmp_path / "artifacts"
    shutil.copytree(trained.path, dst)
    return dst


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisProc]:
    with RedisProc(tmp_path / "redis") as r:
        yield r


@pytest.fixture
def prefix() -> str:
    return f"tt-rel-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def shared_server(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """One server for the read-only checks (schemathesis, bounds, soak): its own artifacts copy and
    its own redis-server, an admin token, and the default limits."""
    root = tmp_path_factory.mktemp("rel-shared")
    art = root / "artifacts"
    shutil.copytree(trained.path, art)
    with RedisProc(root / "redis") as r:
        srv = ServerProc(art, root / "server.log", redis_url=r.url, prefix="tt-rel-shared",
                         env={"TT_ADMIN_TOKEN": ADMIN_TOKEN})
        srv.redis = r  # type: ignore[attr-defined]
        with srv:
            yield srv
