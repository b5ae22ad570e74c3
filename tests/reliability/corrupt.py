"""Ways a bundle can be broken on disk, each with the words the rejection must contain.

Some breakages leave the manifest as it was (the checksum or size check catches them); the nastier
ones re-sign the manifest so every recorded checksum matches the broken files, and only the
deeper checks (the FAISS reader, the dimension checks, the pickle-free loaders of the checkpoint and
of the user tower export) stand between the broken bundle and the service.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index.bundle import MANIFEST, sha256_file
from tests.factories import flip_byte, truncate


def resign(d: Path, **updates: object) -> None:
    """Rewrite the manifest so its checksums and sizes match the files as they are now."""
    m = json.loads((d / MANIFEST).read_text())
    m.update(updates)
    for name in list(m["files"]):
        p = d / name
        if p.is_file():
            m["files"][name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    (d / MANIFEST).write_text(json.dumps(m, indent=2, sort_keys=True))


def set_version(d: Path, version: str) -> None:
    m = json.loads((d / MANIFEST).read_text())
    m["index_version"] = version
    (d / MANIFEST).write_text(json.dumps(m, indent=2, sort_keys=True))


def _other_dim_index(d: Path, dim: int) -> tuple[np.ndarray, object]:
    from index.searcher import FaissSearcher, IdMap

    ids = IdMap.load(d / "item_ids.json")
    vecs = np.random.default_rng(0).standard_normal((len(ids), dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return vecs, FaissSearcher.build(vecs, ids.faiss_ids, "Flat", use_gpu=False)


class Pickled:
    """An object whose unpickling would run code (here: create a marker file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (Path(self.marker),))


def pickled_checkpoint(path: Path, marker: Path) -> None:
    """A torch file that runs code when loaded with weights_only=False."""
    import torch

    torch.save({"format": "twotower-checkpoint/1", "payload": Pickled(str(marker))}, path)


# ---------------------------------------------------------------------------------------------
# the catalogue of breakages: name -> (break the directory, words the rejection must contain)


def truncated_index(d: Path) -> None:
    truncate(d / "index.faiss")


def truncated_index_resigned(d: Path) -> None:
    truncate(d / "index.faiss")
    resign(d)


def flipped_byte(d: Path) -> None:
    flip_byte(d / "item_vectors.npy")


def missing_file(d: Path) -> None:
    (d / "user_items.json").unlink()


def wrong_dimension(d: Path) -> None:
    """Index and vectors of dimension 8, manifest says 8, checksums right: the model says 16."""
    vecs, searcher = _other_dim_index(d, 8)
    np.save(d / "item_vectors.npy", vecs)
    searcher.save(d / "index.faiss")  # type: ignore[attr-defined]
    resign(d, dim=8)


def index_dimension_mismatch(d: Path) -> None:
    """Only the index has dimension 8; vectors and manifest still say 16."""
    _vecs, searcher = _other_dim_index(d, 8)
    searcher.save(d / "index.faiss")  # type: ignore[attr-defined]
    resign(d)


def nan_vectors(d: Path) -> None:
    v = np.load(d / "item_vectors.npy")
    v[3, 0] = np.nan
    np.save(d / "item_vectors.npy", v)
    resign(d)


def garbage_manifest(d: Path) -> None:
    (d / MANIFEST).write_text('{"format": "twotower-bundle/1", "index_version": ')


def pickled_user_tower(d: Path, marker: Path) -> None:
    """The export the service embeds users with, one of its arrays replaced by a pickled object that
    runs code when a careless reader (np.load with allow_pickle=True) opens it."""
    path = d / "user_tower.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    victim = next(k for k in arrays if k != "__meta__")
    arrays[victim] = np.array([Pickled(str(marker))], dtype=object)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    resign(d)


def neighbours_past_the_catalogue(d: Path) -> None:
    """A neighbour table (what recall blends in) naming rows past the catalogue's end, its weight and
    file entered in the manifest and re-signed: the service would index item vectors out of range."""
    n_items = json.loads((d / MANIFEST).read_text())["n_items"]
    with open(d / "neighbours.npz", "wb") as f:
        np.savez(f, indptr=np.array([0, 1] + [1] * (n_items - 1), dtype=np.int64),
                 cols=np.array([n_items + 5], dtype=np.int64), counts=np.array([3.0], dtype=np.float32))
    m = json.loads((d / MANIFEST).read_text())
    m["files"]["neighbours.npz"] = {}
    (d / MANIFEST).write_text(json.dumps(m))
    resign(d, neighbour_weight=0.5)


@dataclass
class Breakage:
    name: str
    apply: Callable[[Path], None]
    says: tuple[str, ...]  # every one of these must appear in the error


def breakages(marker: Path) -> list[Breakage]:
    return [
        Breakage("truncated-index", truncated_index, ("index.faiss", "truncated")),
        Breakage("truncated-index-resigned", truncated_index_resigned, ("index.faiss", "cannot read FAISS index")),
        Breakage("checksum-mismatch", flipped_byte, ("item_vectors.npy", "sha256")),
        Breakage("missing-file", missing_file, ("user_items.json", "missing")),
        Breakage("wrong-dimension", wrong_dimension, ("model outputs dim 16", "index dim is 8")),
        Breakage("index-dimension-mismatch", index_dimension_mismatch, ("index.faiss", "dim 8")),
        Breakage("nan-vectors", nan_vectors, ("NaN",)),
        Breakage("garbage-manifest", garbage_manifest, ("manifest", "not valid JSON")),
        Breakage("pickled-code-user-tower", lambda d: pickled_user_tower(d, marker),
                 ("user_tower.npz", "not a loadable")),
        Breakage("neighbours-past-the-catalogue", neighbours_past_the_catalogue,
                 ("neighbours.npz", "not a consistent neighbour table")),
    ]


def broken_copy(good: Path, dest: Path, version: str, breakage: Breakage) -> Path:
    """Copy a published bundle to ``dest``, give it ``version``, then break it."""
    shutil.copytree(good, dest)
    set_version(dest, version)
    resign(dest)
    breakage.apply(dest)
    return dest
