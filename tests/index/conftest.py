"""One tiny trained model shared by the bundle and reindex tests (training it is the slow part),
and one FAISS thread while these tests run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.index.index_factories import Catalogue, tiny_catalogue, tiny_model, write_model_artifacts
from towers.checkpoint import TwoTowerModel

TINY = {"n_items": 200, "n_users": 80, "per_user": 15, "seed": 3}


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory) -> tuple[Catalogue, TwoTowerModel, Path]:
    """(catalogue, trained model, artifacts root with models/<v>/ and models/LATEST)."""
    cat = tiny_catalogue(**TINY)
    model = tiny_model(cat, steps=60, seed=3)
    root = tmp_path_factory.mktemp("tiny-artifacts")
    write_model_artifacts(root, cat, model)
    return cat, model, root


@pytest.fixture(autouse=True)
def _one_faiss_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tiny indexes gain nothing from a second OpenMP thread, and on a shared CI box an OpenMP
    barrier waiting for a descheduled thread made PQ training 20x slower. TT_FAISS_THREADS also
    reaches the reindex job, which sets its threads itself. Restored afterwards."""
    import faiss

    from index.searcher import set_threads

    before = faiss.omp_get_max_threads()
    monkeypatch.setenv("TT_FAISS_THREADS", "1")
    set_threads()
    yield
    set_threads(before)
