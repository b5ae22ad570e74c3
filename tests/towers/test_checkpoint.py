"""Checkpoints: self-describing round trip, weights-only loading, clear errors for bad files."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.factories import make_model, make_world
from towers.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


@pytest.fixture()
def world():
    return make_world(n_users=10, n_items=20, per_user=5)


@pytest.mark.parametrize("model", ["youtubednn", "dssm"])
def test_round_trip_gives_the_same_vectors(tmp_path: Path, world, model: str) -> None:
    m = make_model(world, model=model)
    path = tmp_path / "model.pt"
    save_checkpoint(path, m, meta={"model_version": "v1"})
    back = load_checkpoint(path)
    assert back.meta["model_version"] == "v1"
    assert back.config == m.config
    assert back.encoder.item_ids == m.encoder.item_ids
    np.testing.assert_array_equal(back.embed_items(world.items), m.embed_items(world.items))
    hist = [[1, 2, 3], [], [4]]
    np.testing.assert_array_equal(back.embed_users(["1", "2", "new"], None, hist),
                                  m.embed_users(["1", "2", "new"], None, hist))


def test_serving_can_load_only_the_user_tower(tmp_path: Path, world) -> None:
    m = make_model(world)
    save_checkpoint(tmp_path / "m.pt", m)
    user_only = load_checkpoint(tmp_path / "m.pt", parts=("user",))
    assert user_only.item_tower is None and user_only.user_tower is not None
    with pytest.raises(RuntimeError, match="without its item tower"):
        user_only.embed_items(world.items)


def test_checkpoint_holds_only_plain_data_and_tensors(tmp_path: Path, world) -> None:
    save_checkpoint(tmp_path / "m.pt", make_model(world))
    payload = torch.load(tmp_path / "m.pt", weights_only=True)  # would raise on any pickled object
    assert payload["format"].startswith("twotower-checkpoint/")
    assert {"config", "encoder", "user_tower", "item_tower", "meta"} <= set(payload)


def test_missing_truncated_and_foreign_files_raise_checkpoint_error(tmp_path: Path, world) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    good = tmp_path / "good.pt"
    save_checkpoint(good, make_model(world))
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError):
        load_checkpoint(garbage)
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else", "weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a twotower-checkpoint"):
        load_checkpoint(other)


class _Exploit:
    """A pickle that would run code on load; weights_only loading must refuse it."""

    def __reduce__(self):  # pragma: no cover - never executed when loading is safe
        return (print, ("code ran while loading a checkpoint",))


def test_a_checkpoint_with_pickled_code_is_refused(tmp_path: Path, world) -> None:
    path = tmp_path / "evil.pt"
    payload = torch.load(_saved(tmp_path, world), weights_only=True)
    payload["meta"] = {"x": _Exploit()}
    with open(path, "wb") as f:
        torch.save(payload, f, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load_checkpoint(path)


def test_a_tampered_state_dict_raises_checkpoint_error(tmp_path: Path, world) -> None:
    payload = torch.load(_saved(tmp_path, world), weights_only=True)
    key = next(iter(payload["user_tower"]))
    payload["user_tower"][key] = torch.zeros(3, 3)  # wrong shape for the config
    bad = tmp_path / "tampered.pt"
    torch.save(payload, bad)
    with pytest.raises(CheckpointError, match="does not match its own config"):
        load_checkpoint(bad)


def _saved(tmp_path: Path, world) -> Path:
    p = tmp_path / "base.pt"
    save_checkpoint(p, make_model(world))
    return p
