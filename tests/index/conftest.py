"""One tiny trained model shared by the bundle and reindex tests (training it is the slow part)."""

from __future__ import annotations

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
