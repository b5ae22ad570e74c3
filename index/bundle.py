"""Versioned index bundles: the only thing the service reads.

A bundle is a directory ``ARTIFACTS/bundles/<index_version>/`` holding::

    manifest.json        versions, counts, dimension, recipe, measured recall, sha256 of every file
    model.pt             the two-tower checkpoint (the service embeds users with its user tower)
    index.faiss          the FAISS index over int64 ids (see IdMap)
    item_ids.json        catalogue ids in row order + their type (IdMap)
    item_vectors.npy     (N, D) float32 item vectors, row r = item_ids[r]
    popular.json         item ids, most popular first (fallback for users with nothing to go on)
    user_tower.npz       the user tower's weights and feature encoder as NumPy arrays + a JSON header
                         (towers.inference.UserEmbedder): the service embeds users from it, no torch
                         needed; absent when the tower has a layer without a NumPy forward, and the
                         service then needs torch to read model.pt
    users.json           user feature table: {user_id: {feature: value}} (missing values null)
    user_items.json      {user_id: [history (last history_len items, oldest first), seen (every item)]}
    neighbours.npz       each item's most frequent neighbours in the histories, by row
                         (towers.neighbours); only when the model blends them into recall
                         (manifest ``neighbour_weight`` > 0)

Publishing is atomic: the bundle is written under ``bundles/.staging-*``, validated, fsynced, renamed
to its version, and then the ``bundles/CURRENT`` pointer is replaced with write-temp + fsync +
``os.replace``. A reader therefore sees either the old bundle or the new one, never a mix, and a
bundle that fails validation is never made current. Running services learn about a new bundle from
a Redis pub/sub message on ``<prefix>:bundles`` and also poll ``CURRENT`` (Redis is optional).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from index.searcher import (
    ExactSearcher,
    FaissSearcher,
    IdMap,
    ItemId,
    Recipe,
    Searcher,
    SearchError,
    faiss_gpus,
    search_users,
    torch_cuda_available,
)
from towers.artifacts import (
    BUNDLES_DIR,
    CURRENT,
    DEFAULT_REDIS_PREFIX,
    atomic_write,
    bundle_dir,
    fsync_dir,
    fsync_tree,
    read_pointer,
    versions,
    write_pointer,
)
from towers.neighbours import META_KEY, SCORE_KEY, UNTAGGED, Neighbours, weight_of
from towers.neighbours import SCORE as NEIGHBOUR_SCORE
from towers.schema import DataError

if TYPE_CHECKING:
    from towers.checkpoint import TwoTowerModel
    from towers.inference import UserEmbedder

log = logging.getLogger(__name__)

FORMAT = "twotower-bundle/2"  # 2: users/user_items as JSON, user_tower.npz (was parquet, model.pt only)
POINTER = CURRENT
STAGING_PREFIX = ".staging-"
DEFAULT_KEEP = 5

MANIFEST = "manifest.json"
MODEL = "model.pt"
INDEX = "index.faiss"
ITEM_IDS = "item_ids.json"
ITEM_VECTORS = "item_vectors.npy"
POPULAR = "popular.json"
USERS = "users.json"
USER_ITEMS = "user_items.json"
USER_TOWER = "user_tower.npz"
NEIGHBOURS = "neighbours.npz"
REQUIRED_FILES = (MODEL, INDEX, ITEM_IDS, ITEM_VECTORS, POPULAR, USERS, USER_ITEMS)


class BundleError(ValueError):
    """A bundle is missing, incomplete, corrupt or inconsistent; the message says which file and why."""


# --------------------------------------------------------------------------------------------
# manifest


@dataclass
class Manifest:
    index_version: str
    model_version: str
    created_at: str  # ISO-8601 UTC
    n_items: int
    dim: int
    id_type: str  # "int" | "str"
    recipe: dict[str, Any]  # Recipe.to_dict()
    recall: float  # measured recall@recall_k of the index against exact search
    recall_k: int
    n_eval_users: int
    n_users: int
    history_len: int
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {sha256, bytes}
    n_cold_items: int = 0  # catalogue items the model never saw (embedded from content only)
    # recall adds this times the last item's neighbours' bonus (neighbours.npz, towers.neighbours);
    # 0: towers alone. neighbour_score: the bonus it was chosen for (a manifest without one: UNTAGGED)
    neighbour_weight: float = 0.0
    neighbour_score: str = NEIGHBOUR_SCORE
    format: str = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def recipe_obj(self) -> Recipe:
        return Recipe.from_dict(self.recipe)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: Mapping[str, Any], where: str = MANIFEST) -> Manifest:
        if not isinstance(d, Mapping):
            raise BundleError(f"{where}: manifest must be a JSON object")
        if d.get("format") != FORMAT:
            hint = ("; it was written by an older reindex job: run `twotower reindex` to publish the catalogue "
                    "in the current format") if d.get("format") == "twotower-bundle/1" else ""
            raise BundleError(f"{where}: format is {d.get('format')!r}, expected {FORMAT!r}{hint}")
        try:
            return Manifest(
                index_version=str(d["index_version"]), model_version=str(d["model_version"]),
                created_at=str(d["created_at"]), n_items=int(d["n_items"]), dim=int(d["dim"]),
                id_type=str(d["id_type"]), recipe=dict(d["recipe"]), recall=float(d["recall"]),
                recall_k=int(d["recall_k"]), n_eval_users=int(d["n_eval_users"]), n_users=int(d["n_users"]),
                history_len=int(d["history_len"]), files={str(k): dict(v) for k, v in d["files"].items()},
                n_cold_items=int(d.get("n_cold_items", 0)), extra=dict(d.get("extra", {})),
                neighbour_weight=float(d.get("neighbour_weight", 0.0)),
                neighbour_score=str(d.get("neighbour_score", UNTAGGED)),
            )
        except KeyError as exc:
            raise BundleError(f"{where}: manifest lacks field {exc.args[0]!r}") from exc
        except (TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"{where}: malformed manifest ({exc})") from exc


def read_manifest(bundle_dir: str | Path) -> Manifest:
    path = Path(bundle_dir) / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BundleError(f"{path}: manifest missing (not a bundle, or an unfinished one)") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: manifest is not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    return Manifest.from_dict(data, where=str(path))


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# --------------------------------------------------------------------------------------------
# writing


def write_bundle(out_dir: str | Path, *, index_version: str, model_version: str, model_path: str | Path,
                 searcher: FaissSearcher, id_map: IdMap, item_vectors: np.ndarray,
                 popular: Sequence[ItemId], users: Any,
                 histories: Mapping[str, Sequence[ItemId]], seen: Mapping[str, Iterable[ItemId]],
                 recall: float, recall_k: int, n_eval_users: int, history_len: int,
                 n_cold_items: int = 0, extra: Mapping[str, Any] | None = None,
                 neighbours: Neighbours | None = None, neighbour_weight: float = 0.0) -> Manifest:
    """Write every bundle file into ``out_dir`` (created; must not exist) and the manifest last.

    The inputs are checked first so a bad catalogue never produces a bundle at all; the manifest
    is written last, so a crash leaves a directory that fails validation instead of a half bundle.
    """
    out = Path(out_dir)
    vecs = np.asarray(item_vectors)
    if vecs.ndim != 2 or vecs.dtype != np.float32:
        raise BundleError(f"item vectors must be a (N, D) float32 array, got {vecs.shape} {vecs.dtype}")
    n, dim = vecs.shape
    if len(id_map) != n:
        raise BundleError(f"{n} item vectors but {len(id_map)} item ids")
    if searcher.ntotal != n or searcher.dim != dim:
        raise BundleError(f"index holds {searcher.ntotal} vectors of dim {searcher.dim}, "
                          f"expected {n} of dim {dim}")
    _check_finite(vecs, "item vectors")
    unknown = [p for p in popular if p not in id_map]
    if unknown:
        raise BundleError(f"popular items not in the catalogue: {unknown[:5]}")
    if neighbour_weight > 0 and (neighbours is None or neighbours.n_items != n):
        raise BundleError(f"a neighbour weight of {neighbour_weight} needs a neighbour table over the {n} items")
    out.mkdir(parents=True, exist_ok=False)

    # a copy, not a hard link: a link would let an in-place edit of either file change the other
    shutil.copyfile(model_path, out / MODEL)
    searcher.save(out / INDEX)
    id_map.save(out / ITEM_IDS)
    np.save(out / ITEM_VECTORS, np.ascontiguousarray(vecs))
    (out / POPULAR).write_text(json.dumps([_plain(p) for p in popular]), encoding="utf-8")
    _export_user_tower(Path(model_path), out / USER_TOWER)
    cols = list(users.columns)
    profiles = {str(uid): {c: _json_value(v) for c, v in zip(cols, vals, strict=True)}
                for uid, vals in zip(users.index, users.itertuples(index=False, name=None), strict=True)}
    _write_json(out / USERS, profiles)
    user_ids = sorted(set(histories) | set(seen))
    _write_json(out / USER_ITEMS, {str(uid): [[_plain(i) for i in histories.get(uid, ())],
                                              sorted({_plain(i) for i in seen.get(uid, ())}, key=_sort_key)]
                                   for uid in user_ids})

    if neighbour_weight > 0 and neighbours is not None:
        neighbours.save(out / NEIGHBOURS)
    names = [*REQUIRED_FILES, *(f for f in (USER_TOWER, NEIGHBOURS) if (out / f).exists())]
    files = {name: {"sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size} for name in names}
    manifest = Manifest(
        index_version=index_version, model_version=model_version,
        created_at=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        n_items=n, dim=dim, id_type=id_map.id_type, recipe=searcher.recipe.to_dict(),
        recall=float(recall), recall_k=int(recall_k), n_eval_users=int(n_eval_users),
        n_users=len(users), history_len=int(history_len), files=files, n_cold_items=int(n_cold_items),
        extra=dict(extra or {}), neighbour_weight=float(neighbour_weight) if neighbours is not None else 0.0,
    )
    atomic_write(out / MANIFEST, json.dumps(manifest.to_dict(), indent=2, sort_keys=True))
    return manifest


def _plain(v: Any) -> Any:
    return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else v


def _json_value(v: Any) -> Any:
    """A feature value as JSON holds it: lists for multi-valued features, null for missing."""
    if isinstance(v, np.ndarray | tuple | list):
        return [_json_value(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _write_json(path: Path, doc: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, separators=(",", ":"), allow_nan=False)


def _export_user_tower(model_path: Path, dest: Path) -> None:
    """Write the checkpoint's user side as the service loads it (towers.inference.UserEmbedder).
    A tower with a layer the NumPy forward cannot mirror gets no export: the service then reads
    model.pt, which needs torch where it runs."""
    from towers.checkpoint import CheckpointError, load_checkpoint

    try:
        model = load_checkpoint(model_path, parts=("user",))
    except CheckpointError as exc:
        raise BundleError(str(exc)) from exc
    try:
        embedder = model.user_embedder()
    except ValueError as exc:
        log.warning("no %s in the bundle (%s): serving it needs torch", USER_TOWER, exc)
        return
    embedder.save(dest)


def _sort_key(v: Any) -> tuple[int, Any]:
    return (0, v) if isinstance(v, int) else (1, str(v))


def _check_finite(vecs: np.ndarray, what: str) -> None:
    # chunked: a memory-mapped 1M x 64 file is checked without a second 256 MB boolean copy
    step = 1 << 16
    for s in range(0, len(vecs), step):
        block = np.asarray(vecs[s:s + step])
        if not np.isfinite(block).all():
            row = s + int(np.argwhere(~np.isfinite(block))[0][0])
            raise BundleError(f"{what} contain NaN or inf (first at row {row})")


# --------------------------------------------------------------------------------------------
# validation


def validate_bundle(bundle_dir: str | Path, *, verify_checksums: bool = True, check_model: bool = True) -> Manifest:
    """Check a bundle completely; return its manifest or raise BundleError naming what is wrong.

    Checks: manifest readable; every required file present with the recorded size and sha256;
    ids unique and as many as vectors; vectors (N, D) float32 and finite; the index loads and holds
    N vectors of dimension D; the model's output dimension is D; popular items are in the catalogue.
    """
    d = Path(bundle_dir)
    if not d.is_dir():
        raise BundleError(f"{d}: bundle directory not found")
    m = read_manifest(d)
    for name in REQUIRED_FILES:
        if name not in m.files:
            raise BundleError(f"{d / MANIFEST}: manifest does not list {name}")
    for name, info in m.files.items():
        p = d / name
        if not p.is_file():
            raise BundleError(f"{p}: file missing")
        size = p.stat().st_size
        if "bytes" in info and size != int(info["bytes"]):
            raise BundleError(f"{p}: {size} bytes, manifest says {info['bytes']} (truncated or replaced)")
        if verify_checksums and sha256_file(p) != info.get("sha256"):
            raise BundleError(f"{p}: sha256 does not match the manifest (file modified or corrupt)")

    try:
        id_map = IdMap.load(d / ITEM_IDS)
    except SearchError as exc:
        raise BundleError(str(exc)) from exc
    if len(id_map) != m.n_items:
        raise BundleError(f"{d / ITEM_IDS}: {len(id_map)} ids, manifest says {m.n_items} items")
    if id_map.id_type != m.id_type:
        raise BundleError(f"{d / ITEM_IDS}: id type {id_map.id_type!r}, manifest says {m.id_type!r}")

    vecs = _load_vectors(d / ITEM_VECTORS)
    if vecs.shape != (m.n_items, m.dim):
        raise BundleError(f"{d / ITEM_VECTORS}: shape {vecs.shape}, manifest says ({m.n_items}, {m.dim})")
    try:
        _check_finite(vecs, str(d / ITEM_VECTORS))
    finally:
        del vecs

    searcher = _load_index(d / INDEX, m.recipe_obj, use_gpu=False)
    if searcher.ntotal != m.n_items or searcher.dim != m.dim:
        raise BundleError(f"{d / INDEX}: index holds {searcher.ntotal} vectors of dim {searcher.dim}, "
                          f"manifest says {m.n_items} of dim {m.dim}")
    del searcher

    popular = _load_json(d / POPULAR)
    if not isinstance(popular, list):
        raise BundleError(f"{d / POPULAR}: expected a JSON list of item ids")
    missing = [p for p in popular if p not in id_map]
    if missing:
        raise BundleError(f"{d / POPULAR}: items not in the catalogue: {missing[:5]}")

    if check_model:
        dim = _checkpoint_dim(d / MODEL)
        if dim != m.dim:
            raise BundleError(f"{d / MODEL}: model outputs dim {dim}, index dim is {m.dim}")
    for name in (USERS, USER_ITEMS):
        if not isinstance(_load_json(d / name), dict):
            raise BundleError(f"{d / name}: expected a JSON object keyed by user id")
    if USER_TOWER in m.files:
        _load_user_tower(d / USER_TOWER, m.dim)
    _load_neighbours(d, m)
    return m


def _load_neighbours(d: Path, m: Manifest) -> Neighbours | None:
    """neighbours.npz when the manifest blends it into recall, else None."""
    # 0 as well for a weight published for another bonus (before the cosine): its weight means nothing now
    if not (weight_of({META_KEY: m.neighbour_weight, SCORE_KEY: m.neighbour_score},
                      str(d / MANIFEST)) > 0):
        return None
    if not math.isfinite(m.neighbour_weight):
        raise BundleError(f"{d / MANIFEST}: neighbour_weight {m.neighbour_weight} is not finite")
    if NEIGHBOURS not in m.files:
        raise BundleError(f"{d / MANIFEST}: neighbour_weight {m.neighbour_weight} but no {NEIGHBOURS} listed")
    try:
        return Neighbours.load(d / NEIGHBOURS, n_items=m.n_items)
    except (OSError, ValueError, KeyError) as exc:
        raise BundleError(f"{d / NEIGHBOURS}: {exc}") from exc


def _load_user_tower(path: Path, dim: int) -> Any:
    from towers.inference import UserEmbedder

    try:
        model = UserEmbedder.load(path)
    except ValueError as exc:
        raise BundleError(str(exc)) from exc
    if model.dim != dim:
        raise BundleError(f"{path}: model outputs dim {model.dim}, index dim is {dim}")
    return model


def _checkpoint_dim(path: Path) -> int:
    """Output dimension recorded in a checkpoint, read without loading its weights.

    ``mmap=True`` maps the tensors instead of reading them, so checking a 1M-item model (hundreds
    of MB of embedding tables) costs milliseconds; weights_only keeps it from running code.
    """
    import torch

    from towers.checkpoint import FORMAT as CKPT_FORMAT
    from towers.model import TowerConfig

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated zip, not a torch file, pickled code...
        raise BundleError(f"{path}: not a loadable checkpoint ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CKPT_FORMAT:
        raise BundleError(f"{path}: not a {CKPT_FORMAT} file")
    try:
        return int(TowerConfig.from_dict(payload["config"]).dim)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{path}: checkpoint config unreadable ({exc})") from exc


def _load_vectors(path: Path, mmap: bool = True) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise BundleError(f"{path}: unreadable vectors ({exc})") from exc
    if arr.ndim != 2 or arr.dtype != np.float32:
        raise BundleError(f"{path}: expected a (N, D) float32 array, got {arr.shape} {arr.dtype}")
    return arr


def _load_index(path: Path, recipe: Recipe, use_gpu: bool | None) -> FaissSearcher:
    try:
        return FaissSearcher.load(path, recipe, use_gpu=use_gpu)
    except SearchError as exc:
        raise BundleError(str(exc)) from exc


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable JSON ({exc})") from exc


# --------------------------------------------------------------------------------------------
# loading (the service)


@dataclass
class LoadedBundle:
    """Everything the service needs, loaded from one bundle directory."""

    path: Path
    manifest: Manifest
    model: UserEmbedder | TwoTowerModel  # the NumPy user side (user_tower.npz), or the checkpoint
    searcher: Searcher
    id_map: IdMap
    item_vectors: np.ndarray  # (N, D) float32, memory-mapped
    popular: list[ItemId]
    user_features: dict[str, dict[str, Any]]  # user_id -> {feature: value}
    histories: dict[str, list[ItemId]]  # user_id -> last history_len items, oldest first
    seen: dict[str, frozenset[ItemId]]  # user_id -> every item the user interacted with
    neighbours: Neighbours | None = None  # the last item's neighbours, by row, when recall blends them

    @property
    def index_version(self) -> str:
        return self.manifest.index_version

    @property
    def model_version(self) -> str:
        return self.manifest.model_version

    def item_vector(self, item_id: Any) -> np.ndarray:
        """(D,) vector of a catalogue item; KeyError for an unknown id."""
        return np.asarray(self.item_vectors[self.id_map.row_of(item_id)], dtype=np.float32)

    def search(self, queries: np.ndarray, k: int) -> list[tuple[list[ItemId], list[float]]]:
        """Search and translate FAISS ids to catalogue ids: one (item ids, scores) per query ((B, D)
        vectors, or (B, K, D) multi-interest users: index.searcher.search_users)."""
        scores, ids = search_users(self.searcher, queries, k)
        out = []
        for s_row, i_row in zip(scores, ids, strict=True):
            keep = np.flatnonzero(i_row >= 0)[:k]
            out.append((self.id_map.to_items(i_row[keep]), [float(x) for x in s_row[keep]]))
        return out

    def similar_items(self, item_id: Any, k: int) -> tuple[list[ItemId], list[float]]:
        """Items nearest to ``item_id`` by item-vector inner product, the item itself excluded.

        KeyError for an item not in the catalogue; ValueError for an id of the wrong type.
        """
        row = self.id_map.row_of(item_id)
        own = int(self.id_map.faiss_ids[row])
        q = np.asarray(self.item_vectors[row], dtype=np.float32)[None, :]  # (1, D)
        scores, ids = self.searcher.search(q, k + 1)
        keep = (ids[0] >= 0) & (ids[0] != own)
        items = self.id_map.to_items(ids[0][keep])[:k]
        return items, [float(x) for x in scores[0][keep][:k]]


def load_bundle(bundle_dir: str | Path, *, verify: bool = True, backend: str = "auto",
                parts: Sequence[str] = ("user",)) -> LoadedBundle:
    """Validate (unless ``verify=False``) and load a bundle.

    ``backend``: "auto" uses faiss-gpu when it sees a GPU, else an exact torch search on CUDA when
    torch has CUDA but FAISS has no GPU support, else FAISS on the CPU; "faiss" and "torch" force one.
    ``parts``: the towers to load; the service needs only the user tower.
    """
    d = Path(bundle_dir)
    m = validate_bundle(d, check_model=False) if verify else read_manifest(d)
    id_map = IdMap.load(d / ITEM_IDS)
    vecs = _load_vectors(d / ITEM_VECTORS)
    searcher: Searcher
    if backend == "torch" or (backend == "auto" and faiss_gpus() == 0 and torch_cuda_available()):
        searcher = ExactSearcher(np.asarray(vecs), id_map.faiss_ids)
        log.info("bundle %s: exact torch search on %s", m.index_version, searcher.device)
    elif backend in ("auto", "faiss"):
        searcher = _load_index(d / INDEX, m.recipe_obj, use_gpu=None)
    else:
        raise ValueError(f"unknown search backend {backend!r} (auto, faiss, torch)")
    model: Any
    if tuple(parts) == ("user",) and USER_TOWER in m.files:
        model = _load_user_tower(d / USER_TOWER, m.dim)  # NumPy only: what the api image runs
    else:
        model = _load_model(d / MODEL, parts, m.dim)

    popular = [id_map.parse(p) for p in _load_json(d / POPULAR)]
    user_features = {str(uid): {c: tuple(v) if isinstance(v, list) else v for c, v in prof.items()}
                     for uid, prof in _load_json(d / USERS).items()}
    conv = int if id_map.id_type == "int" else str
    histories: dict[str, list[ItemId]] = {}
    seen: dict[str, frozenset[ItemId]] = {}
    for uid, (hist, seen_items) in _load_json(d / USER_ITEMS).items():
        histories[uid] = [conv(i) for i in hist]
        seen[uid] = frozenset(conv(i) for i in seen_items)
    return LoadedBundle(path=d, manifest=m, model=model, searcher=searcher, id_map=id_map, item_vectors=vecs,
                        popular=popular, user_features=user_features, histories=histories, seen=seen,
                        neighbours=_load_neighbours(d, m))


def _load_model(path: Path, parts: Sequence[str], dim: int) -> Any:
    """The checkpoint itself (torch): the jobs, and a bundle whose user tower has no NumPy export."""
    try:
        from towers.checkpoint import CheckpointError, load_checkpoint
    except ImportError as exc:
        raise BundleError(f"{path.parent}: this bundle has no {USER_TOWER} (its user tower needs torch), "
                          f"and torch is not installed here ({exc})") from exc
    try:
        model = load_checkpoint(path, parts=parts)
    except CheckpointError as exc:
        raise BundleError(str(exc)) from exc
    if model.config.dim != dim:
        raise BundleError(f"{path}: model outputs dim {model.config.dim}, index dim is {dim}")
    return model


# --------------------------------------------------------------------------------------------
# publishing, pointer, rollback, pruning


def bundles_root(artifacts: str | Path) -> Path:
    return Path(artifacts) / BUNDLES_DIR


def staging_dir(artifacts: str | Path, index_version: str) -> Path:
    """Where a job writes a bundle before publishing: beside its final place (same filesystem, so
    the publishing rename is atomic) and hidden from list_bundles by its leading dot."""
    root = bundles_root(artifacts)
    root.mkdir(parents=True, exist_ok=True)
    return root / f"{STAGING_PREFIX}{index_version}-{secrets.token_hex(3)}"


def current_version(artifacts: str | Path) -> str | None:
    """The version named by ``bundles/CURRENT``, or None when nothing was published yet."""
    p = bundles_root(artifacts) / POINTER
    try:
        return read_pointer(p, what="bundle version")
    except DataError as exc:
        raise BundleError(f"pointer does not name a bundle: {exc}") from None


def current_bundle_dir(artifacts: str | Path) -> Path | None:
    """Directory of the current bundle, None when nothing was published; BundleError when the
    pointer names a bundle that is not there."""
    v = current_version(artifacts)
    if v is None:
        return None
    d = bundle_dir(artifacts, v)
    if not d.is_dir():
        raise BundleError(f"{bundles_root(artifacts) / POINTER} names {v!r}, which does not exist")
    return d


def publish(artifacts: str | Path, staged_dir: str | Path, *, keep: int = DEFAULT_KEEP,
            redis_url: str | None = None, prefix: str = DEFAULT_REDIS_PREFIX) -> Path:
    """Validate ``staged_dir``, move it to ``bundles/<index_version>`` and make it current.

    On any validation error the staged directory is removed, CURRENT is untouched and BundleError
    is raised. Returns the published bundle directory.
    """
    root = bundles_root(artifacts)
    root.mkdir(parents=True, exist_ok=True)
    staged = Path(staged_dir)
    try:
        m = validate_bundle(staged)
    except BundleError:
        if staged.parent.resolve() == root.resolve() and staged.name.startswith(STAGING_PREFIX):
            shutil.rmtree(staged, ignore_errors=True)
        raise
    try:  # the manifest names the directory: "../x" must not publish outside bundles/
        target = bundle_dir(artifacts, m.index_version, source=staged / MANIFEST)
    except DataError as exc:
        raise BundleError(str(exc)) from None
    if target.exists():
        raise BundleError(f"{target}: a bundle with index version {m.index_version} already exists")
    if staged.parent.resolve() != root.resolve():
        # staged elsewhere (maybe another filesystem): copy beside the target first so the final
        # step is still a same-directory rename
        tmp = root / f"{STAGING_PREFIX}{m.index_version}-{secrets.token_hex(3)}"
        shutil.copytree(staged, tmp)
        staged = tmp
    fsync_tree(staged)
    os.rename(staged, target)
    fsync_dir(root)
    write_pointer(root / POINTER, m.index_version)
    log.info("published bundle %s (model %s, %d items, recall@%d %.4f)", m.index_version, m.model_version,
             m.n_items, m.recall_k, m.recall)
    prune(artifacts, keep=keep)
    notify(redis_url, prefix, m)
    return target


def rollback(artifacts: str | Path, *, to: str | None = None, redis_url: str | None = None,
             prefix: str = DEFAULT_REDIS_PREFIX) -> Manifest:
    """Re-point CURRENT to the newest bundle older than the current one (or to ``to``).

    The target is validated first; an invalid target leaves CURRENT as it was.
    """
    root = bundles_root(artifacts)
    cur = current_version(artifacts)
    versions = _versions(root)
    if to is not None:
        if to not in versions:
            raise BundleError(f"no bundle {to!r} under {root} (have: {', '.join(versions) or 'none'})")
        target = to
    else:
        older = [v for v in versions if cur is None or v < cur]
        if not older:
            raise BundleError(f"no bundle older than {cur!r} under {root} to roll back to")
        target = older[-1]
    m = validate_bundle(root / target)
    write_pointer(root / POINTER, target)
    log.info("rolled back from %s to %s", cur, target)
    notify(redis_url, prefix, m)
    return m


@dataclass
class BundleInfo:
    version: str
    path: Path
    current: bool
    manifest: Manifest | None
    error: str | None = None


def list_bundles(artifacts: str | Path, *, validate: bool = False) -> list[BundleInfo]:
    """Published bundles, newest first, with their manifests (or the reason one cannot be read)."""
    root = bundles_root(artifacts)
    try:
        cur = current_version(artifacts)
    except BundleError:
        cur = None
    out = []
    for v in reversed(_versions(root)):
        try:
            m: Manifest | None = validate_bundle(root / v) if validate else read_manifest(root / v)
            err = None
        except BundleError as exc:
            m, err = None, str(exc)
        out.append(BundleInfo(version=v, path=root / v, current=v == cur, manifest=m, error=err))
    return out


def prune(artifacts: str | Path, *, keep: int = DEFAULT_KEEP, stale_staging_s: float = 3600.0) -> list[str]:
    """Delete all but the newest ``keep`` bundles (never the current one) and stale staging dirs."""
    if keep < 1:
        raise BundleError(f"keep must be >= 1, got {keep}")
    root = bundles_root(artifacts)
    cur = current_version(artifacts)
    versions = _versions(root)
    doomed = [v for v in versions[:-keep] if v != cur] if len(versions) > keep else []
    for v in doomed:
        shutil.rmtree(root / v, ignore_errors=True)
        log.info("pruned bundle %s", v)
    now = time.time()
    for p in root.glob(f"{STAGING_PREFIX}*"):
        try:
            if p.is_dir() and now - p.stat().st_mtime > stale_staging_s:
                shutil.rmtree(p, ignore_errors=True)
        except FileNotFoundError:  # another job finished with it meanwhile
            pass
    return doomed


def _versions(root: Path) -> list[str]:
    """Bundle directory names, oldest first (versions sort by time)."""
    return versions(root, containing=MANIFEST)


# --------------------------------------------------------------------------------------------
# notification


def channel(prefix: str = DEFAULT_REDIS_PREFIX) -> str:
    return f"{prefix}:bundles"


def notify(redis_url: str | None, prefix: str, manifest: Manifest) -> int | None:
    """Publish {index_version, model_version} on ``<prefix>:bundles``.

    Returns the number of subscribers reached, or None when Redis is not configured or down: a
    notification is a hint (services also poll CURRENT), so it must never fail a publish.
    """
    if not redis_url:
        return None
    msg = json.dumps({"index_version": manifest.index_version, "model_version": manifest.model_version})
    try:
        import redis

        client = redis.Redis.from_url(redis_url, socket_connect_timeout=1.0, socket_timeout=1.0)
        try:
            return int(client.publish(channel(prefix), msg))
        finally:
            client.close()
    except Exception as exc:  # any connection problem: warn and go on
        log.warning("could not notify services on %s via %s (%s); they will pick the bundle up by polling",
                    channel(prefix), redis_url, exc)
        return None
