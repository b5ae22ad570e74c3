"""Artifact plumbing (towers.artifacts): version names sort in creation order, names from outside
never reach out of the artifacts root, and pointer files are written whole and durably."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import numpy as np
import pytest

from towers import artifacts as A
from towers.schema import DataError


def test_versions_made_in_a_burst_sort_in_the_order_they_were_made() -> None:
    # a burst lands within one second: a random suffix would order these by chance
    made = [A.new_version() for _ in range(200)]
    assert made == sorted(made) and len(set(made)) == len(made)


def test_a_version_name_orders_by_the_microsecond_within_one_second() -> None:
    t = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    names = [A.new_version(t.replace(microsecond=us)) for us in (0, 9, 15, 4096, 999_999)]
    assert names == sorted(names)
    assert names[0] == "20260102T030405Z-000000" and names[-1] == "20260102T030405Z-0f423f"
    assert A.new_version(t.replace(second=6)) > names[-1]


@pytest.mark.parametrize("name", ["", ".", "..", ".staging-x", "../x", "a/b", "a\\b", "/tmp", "x\0y", 3, None])
def test_a_name_that_is_not_one_version_directory_is_refused(tmp_path: Path, name: object) -> None:
    assert not A.is_version(name)
    with pytest.raises(DataError, match="not a version name"):
        A.model_dir(tmp_path, name)
    with pytest.raises(DataError, match="not a version name"):
        A.bundle_dir(tmp_path, name)


def test_version_dirs_lie_inside_the_artifacts_root(tmp_path: Path) -> None:
    v = A.new_version()
    assert A.model_dir(tmp_path, v) == tmp_path / "models" / v
    assert A.bundle_dir(tmp_path, v) == tmp_path / "bundles" / v


def _model(artifacts: Path, version: str) -> Path:
    d = artifacts / "models" / version
    d.mkdir(parents=True)
    (d / "model.pt").write_bytes(b"x")
    return d


def test_resolve_model_dir_follows_latest_and_refuses_a_pointer_outside(tmp_path: Path) -> None:
    art = tmp_path / "a" / "artifacts"
    v = A.new_version()
    _model(art, v)
    with pytest.raises(DataError, match="LATEST does not exist"):
        A.resolve_model_dir(art, None)
    A.write_pointer(art / "models" / A.LATEST, v)
    assert A.resolve_model_dir(art, None) == (art / "models" / v, v)
    assert A.resolve_model_dir(art, v) == (art / "models" / v, v)
    # a model.pt exists at each of these, outside models/: none may be reached
    _model(tmp_path / "a", "outside")
    (art / "model.pt").write_bytes(b"x")
    for bad in ("../../outside", "..", str(tmp_path / "a" / "models" / "outside")):
        with pytest.raises(DataError, match="model version"):
            A.resolve_model_dir(art, bad)
        (art / "models" / A.LATEST).write_text(bad + "\n")
        with pytest.raises(DataError, match="LATEST"):
            A.resolve_model_dir(art, None)
    (art / "models" / A.LATEST).write_text("\n")
    with pytest.raises(DataError, match="empty"):
        A.resolve_model_dir(art, None)
    with pytest.raises(DataError, match="has no model.pt"):
        A.resolve_model_dir(art, A.new_version())


def test_versions_lists_only_version_directories_oldest_first(tmp_path: Path) -> None:
    made = [A.new_version() for _ in range(3)]
    for v in reversed(made):
        (tmp_path / v).mkdir()
        (tmp_path / v / "last.pt").write_bytes(b"")
    (tmp_path / ".staging-x").mkdir()
    (tmp_path / "LATEST").write_text(made[0])
    (tmp_path / made[1] / "last.pt").unlink()
    assert A.versions(tmp_path) == made
    assert A.versions(tmp_path, containing="last.pt") == [made[0], made[2]]
    assert A.versions(tmp_path / "nothing-here") == []


def _fsynced_paths(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record what each os.fsync call flushed (the file or directory behind the descriptor)."""
    seen: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name a descriptor")
def test_a_pointer_is_written_durably(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """models/LATEST once lost its content on a power cut after a publish (renamed, never fsynced):
    now the new content is on disk before the rename, and the rename before the call returns."""
    seen = _fsynced_paths(monkeypatch)
    pointer = tmp_path / "models" / A.LATEST
    A.write_pointer(pointer, "20260101T000000Z-000001")
    assert pointer.read_text() == "20260101T000000Z-000001\n"
    files = [p for p in seen if Path(p).parent == pointer.parent and Path(p).name.startswith(".LATEST.")]
    assert files, seen  # the temporary file's content, before os.replace made it LATEST
    assert seen[-1] == str(pointer.parent), seen  # then the directory entry
    assert sorted(p.name for p in pointer.parent.iterdir()) == ["LATEST"]  # no temporary left behind
    assert pointer.stat().st_mode & 0o777 == 0o644


def test_training_publishes_latest_through_the_durable_pointer(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from training.train import update_latest

    seen = _fsynced_paths(monkeypatch)
    (tmp_path / "models").mkdir()
    update_latest(tmp_path / "models", "20260101T000000Z-000002")
    assert (tmp_path / "models" / "LATEST").read_text().strip() == "20260101T000000Z-000002"
    assert str(tmp_path / "models") in seen


def test_an_interrupted_write_leaves_the_old_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    A.atomic_write_json(path, {"a": np.int64(1), "b": np.float32(0.5), "p": Path("x")})
    before = path.read_bytes()
    assert json.loads(before) == {"a": 1, "b": 0.5, "p": "x"}
    with pytest.raises(RuntimeError), A.atomic_open(path, "w") as f:
        f.write('{"a": 2')
        raise RuntimeError("killed half way")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    with pytest.raises(TypeError, match="not JSON serialisable"):
        A.atomic_write_json(path, {"x": object()})
    assert path.read_bytes() == before
