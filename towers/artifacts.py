"""Artifact plumbing every job and the service share: version names, directories inside the
artifacts root, and durable atomic writes.

An artifacts root holds::

    models/<model_version>/    one training run (model.pt, config.json, last.pt, data/, ...)
    models/LATEST              names the newest COMPLETE model version (the training job writes it last)
    bundles/<index_version>/   one published index bundle (see index.bundle)
    bundles/CURRENT            names the bundle the service serves

Both kinds of version share one name format, ``YYYYmmddTHHMMSSZ-<6 hex>``, which sorts in creation
order: "the newest" (resume latest, rollback, pruning) is simply the largest name. Every name that
comes from outside (a CLI flag, a pointer file, an admin request) is checked to be one directory
under its folder before it is joined to a path, so ``..`` or an absolute path never reaches outside
the artifacts root. Pointers and other small files are replaced whole and fsynced, so a crash
leaves the old content or the new, never half of either, and never loses a published pointer.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Final, Literal

import numpy as np

from towers.schema import DataError

MODELS_DIR: Final = "models"
BUNDLES_DIR: Final = "bundles"
LATEST = "LATEST"  # models/LATEST
CURRENT = "CURRENT"  # bundles/CURRENT
MODEL_FILE = "model.pt"

# Where a job announces a new bundle to running services (pub/sub on <prefix>:bundles) and where
# the service keeps its cache and events: the one default for the jobs, the service and the demo.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_REDIS_PREFIX = "tt"

Kind = Literal["models", "bundles"]

# ------------------------------------------------------------------------------------------------
# version names

_last_issued: _dt.datetime | None = None
_issue_lock = threading.Lock()


def new_version(now: _dt.datetime | None = None) -> str:
    """A sortable version name ``YYYYmmddTHHMMSSZ-<6 hex>`` (UTC).

    The hex is the microsecond (at most 0xF423F), not a random tag: two versions made within one
    second must still sort in the order they were made, because "the newest" (resume latest,
    rollback, pruning) is picked by name. Without ``now``, names issued by one process are strictly
    increasing even when the clock does not move between two calls.
    """
    global _last_issued
    if now is None:
        with _issue_lock:
            now = _dt.datetime.now(_dt.UTC)
            if _last_issued is not None and now <= _last_issued:
                now = _last_issued + _dt.timedelta(microseconds=1)
            _last_issued = now
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{now.microsecond:06x}"


def is_version(name: object) -> bool:
    """True when ``name`` can be one version directory: not empty, not hidden (``.``, ``..``, the
    ``.staging-*`` directories of unfinished bundles) and without a path separator."""
    return (isinstance(name, str) and bool(name) and not name.startswith(".")
            and not any(c in name for c in "/\\\0") and not Path(name).is_absolute())


def check_version(name: object, *, source: str | Path | None = None, what: str = "version") -> str:
    """``name`` when it is a version name (see ``is_version``), else DataError naming ``source``
    (the file or folder it came from)."""
    if not is_version(name):
        raise DataError(f"{what} {name!r} is not a version name (one directory under its folder)", path=source)
    return str(name)


def versions(folder: str | Path, *, containing: str | None = None) -> list[str]:
    """Version directories in ``folder``, oldest first; only those holding ``containing`` when given."""
    root = Path(folder)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if is_version(p.name) and p.is_dir() and (containing is None or (p / containing).exists()))


# ------------------------------------------------------------------------------------------------
# paths inside the artifacts root


def version_dir(artifacts: str | Path, kind: Kind, version: object, *, source: str | Path | None = None,
                what: str | None = None) -> Path:
    """``artifacts/<kind>/<version>``, after checking that ``version`` is one directory name."""
    folder = Path(artifacts) / kind
    name = check_version(version, source=source if source is not None else folder,
                         what=what or ("model version" if kind == MODELS_DIR else "bundle version"))
    return folder / name


def model_dir(artifacts: str | Path, version: object, *, source: str | Path | None = None) -> Path:
    return version_dir(artifacts, MODELS_DIR, version, source=source)


def bundle_dir(artifacts: str | Path, version: object, *, source: str | Path | None = None) -> Path:
    return version_dir(artifacts, BUNDLES_DIR, version, source=source)


def read_pointer(path: str | Path, *, what: str = "version") -> str | None:
    """The version a pointer file (models/LATEST, bundles/CURRENT) names; None when the file does
    not exist; DataError when it is empty or names something that is not a version."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    if not text:
        raise DataError(f"{p.parent.name}/{p.name} is empty", path=p)
    return check_version(text, source=p, what=what)


def write_pointer(path: str | Path, version: str) -> None:
    """Make the pointer file name ``version``, durably (the pointer is what publishes a version)."""
    atomic_write(path, check_version(version, source=path) + "\n")


def resolve_model_dir(artifacts: str | Path, version: str | None) -> tuple[Path, str]:
    """(model version directory, version) for ``version``, or for the one models/LATEST names when
    ``version`` is None. DataError when the name is not a version or the version has no model.pt."""
    models = Path(artifacts) / MODELS_DIR
    if version is None:
        latest = models / LATEST
        named = read_pointer(latest, what="model version")
        if named is None:
            raise DataError("no model version given and models/LATEST does not exist (train a model first)",
                            path=latest)
        d = model_dir(artifacts, named, source=latest)
    else:
        d = model_dir(artifacts, version)
    if not (d / MODEL_FILE).is_file():
        raise DataError(f"model version {d.name!r} has no {MODEL_FILE}", path=d)
    return d, d.name


# ------------------------------------------------------------------------------------------------
# durable atomic writes


@contextmanager
def atomic_open(path: str | Path, mode: Literal["wb", "w"] = "wb") -> Iterator[IO[Any]]:
    """Write ``path`` whole or not at all: a temporary file beside it, fsynced, renamed over it,
    then the directory fsynced so the rename itself survives a power cut. On an exception inside
    the block the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        f: IO[Any] = os.fdopen(fd, "wb") if mode == "wb" else os.fdopen(fd, "w", encoding="utf-8")
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; a service running as another user (the Docker image) must read it
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` (text is written as UTF-8) durably; see ``atomic_open``."""
    with atomic_open(path, "w" if isinstance(data, str) else "wb") as f:
        f.write(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as indented, key-sorted JSON (numpy scalars, paths and tuples allowed), durably."""
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def fsync_tree(d: str | Path) -> None:
    """fsync every file below ``d`` and ``d`` itself (before a directory is published by rename)."""
    d = Path(d)
    for p in d.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(d)


def fsync_dir(d: str | Path) -> None:
    """fsync a directory, so renames and new entries in it are on disk."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)
