"""Nearest-neighbour search over item vectors: the ONE module that talks to FAISS.

Everything else (the reindex job, the bundle loader, the service) goes through the ``Searcher``
protocol: ``search(queries (B, D) float32, k) -> (scores (B, k) float32, ids (B, k) int64)``.
Scores are inner products (the towers emit L2-normalised vectors, so they are cosines). Where an
index has fewer than ``k`` results for a query the row is padded with id ``-1`` and score ``-inf``,
whatever the backend, so callers filter on ``ids >= 0`` alone.

Two backends share that contract:
- ``FaissSearcher``: any FAISS factory string (Flat, IVFn,Flat, IVFn,PQm, HNSW32, SQ8, ...), ids
  given with ``add_with_ids``; moved to the GPU when faiss-gpu sees one.
- ``ExactSearcher``: exact matmul + top-k in torch (CPU or CUDA): the ground truth for the recall
  gate and for tests, and the search on CUDA when faiss-gpu is missing.

``recall_at_k`` is FAISS's own intersection measure.

``IdMap`` translates between catalogue item ids (int or str) and the int64 ids FAISS stores.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # faiss and torch are imported lazily: `twotower --help` must stay fast
    import faiss

log = logging.getLogger(__name__)

ItemId = int | str
# FAISS pads missing results with -FLT_MAX for inner product; we normalise that to -inf everywhere.
_PAD_SCORE = -np.inf
# Exact search computes score blocks of at most this many floats (256 MiB) to bound memory.
_BLOCK_ELEMS = 64 * 1024 * 1024


class SearchError(ValueError):
    """Bad search input or an index that cannot be built/loaded; the message says which."""


@runtime_checkable
class Searcher(Protocol):
    dim: int

    @property
    def ntotal(self) -> int: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries (B, D) float32 -> scores (B, k) float32, ids (B, k) int64 (-1 where fewer)."""
        ...


# --------------------------------------------------------------------------------------------
# threads and GPU detection


def set_threads(n: int | None = None) -> int:
    """Set FAISS's OpenMP thread count (default: env TT_FAISS_THREADS, else the CPU count).

    Oversubscribing a 2-core box with more OpenMP threads than cores makes every search slower, and
    FAISS's default can exceed the cores a container is given, so we set it explicitly.
    """
    import faiss

    if n is None:
        env = os.environ.get("TT_FAISS_THREADS", "").strip()
        n = int(env) if env else _available_cpus()
    n = max(1, int(n))
    faiss.omp_set_num_threads(n)
    return n


def _available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def faiss_gpus() -> int:
    """Number of GPUs faiss can use (0 with faiss-cpu)."""
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a runtime dependency
        return False
    return bool(torch.cuda.is_available())


# --------------------------------------------------------------------------------------------
# input checks shared by every backend


def _check_vectors(vectors: np.ndarray, what: str = "vectors") -> np.ndarray:
    arr = np.asarray(vectors)
    if arr.ndim != 2:
        raise SearchError(f"{what} must be a 2-D array (N, D), got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise SearchError(f"{what} have dimension 0")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = int(np.argwhere(~np.isfinite(arr))[0][0])
        raise SearchError(f"{what} contain NaN or inf (first at row {bad})")
    return arr


def _check_ids(ids: np.ndarray, n: int) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.shape != (n,):
        raise SearchError(f"ids must have shape ({n},), got {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise SearchError(f"FAISS ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if n and ids.min() < 0:
        raise SearchError("FAISS ids must be >= 0 (-1 marks a missing result)")
    if len(np.unique(ids)) != n:
        raise SearchError("FAISS ids are not unique")
    return ids


def _check_queries(queries: np.ndarray, dim: int, k: int) -> np.ndarray:
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dim:
        raise SearchError(f"queries must have shape (B, {dim}), got {np.asarray(queries).shape}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise SearchError(f"k must be a positive integer, got {k!r}")
    q = np.ascontiguousarray(q, dtype=np.float32)
    if not np.isfinite(q).all():
        raise SearchError("queries contain NaN or inf")
    return q


def _pad(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad (B, k') results to (B, k) with id -1 / score -inf."""
    b, have = ids.shape
    if have >= k:
        return scores, ids
    s = np.full((b, k), _PAD_SCORE, dtype=np.float32)
    i = np.full((b, k), -1, dtype=np.int64)
    s[:, :have] = scores
    i[:, :have] = ids
    return s, i


# --------------------------------------------------------------------------------------------
# exact search


class ExactSearcher:
    """Exact inner-product search, one matmul + top-k per block in torch: the ground truth every
    index is measured against, and the GPU path when faiss-gpu is not installed.

    One implementation for the CPU and CUDA. On 2 CPU cores it is the fastest exact search we
    have measured: 1000 queries x 1M x 64, k=100 took 4.1 s, against 5.1 s for ``faiss.knn`` and
    5.6 s for ``IndexFlatIP`` (FAISS updates a heap per scored item), and the same 0.4 s as the
    others at 100k (a numpy twin, argpartition per block, was as fast at 100k and is gone).
    Measured side by side in one run under the CPU lock: normalised Gaussian vectors,
    ``ExactSearcher(x).search(q, 100)`` vs ``faiss.knn(q, x, 100, faiss.METRIC_INNER_PRODUCT)`` vs
    ``IndexFlatIP(64)`` add + search, 2 threads each (``set_threads(2)``, ``torch.set_num_threads(2)``),
    best of 2 runs; all three returned the same neighbours.
    """

    def __init__(self, vectors: np.ndarray, ids: np.ndarray | None = None, device: str | None = None,
                 half: bool = False) -> None:
        import torch

        vecs = _check_vectors(vectors)
        n = vecs.shape[0]
        self.ids = _check_ids(np.arange(n) if ids is None else ids, n)
        self.dim = int(vecs.shape[1])
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.float16 if half and self.device.type == "cuda" else torch.float32
        with warnings.catch_warnings():
            # a bundle's memory-mapped vectors are read-only; the tensor is only ever read, so
            # sharing them (instead of a 256 MB copy at 1M x 64) is safe
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self._vectors = torch.from_numpy(vecs).to(self.device, dtype=dtype)  # (N, D)
        self._ids = torch.from_numpy(self.ids).to(self.device)

    @property
    def ntotal(self) -> int:
        return int(self._vectors.shape[0])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        q = _check_queries(queries, self.dim, k)
        kk = min(k, self.ntotal)
        b = q.shape[0]
        if kk == 0:
            return _pad(np.empty((b, 0), np.float32), np.empty((b, 0), np.int64), k)
        n = self.ntotal
        # 2-D blocks: (up to 1024 queries) x (as many items as fit the block budget), so a 1M-item
        # catalogue never needs a (B, N) matrix at once. Wide item blocks keep the matmul
        # BLAS-shaped on a CPU; a running top-k merges the blocks.
        q_block = min(b, 1024)
        item_block = max(kk, min(n, _BLOCK_ELEMS // q_block))
        scores, ids = [], []
        with torch.inference_mode():
            qt = torch.from_numpy(q).to(self.device, dtype=self._vectors.dtype)  # (B, D)
            for q0 in range(0, b, q_block):
                qb = qt[q0:q0 + q_block]
                best_s = best_r = None
                for i0 in range(0, n, item_block):
                    s = qb @ self._vectors[i0:i0 + item_block].T  # (bq, ib)
                    top_s, top_r = torch.topk(s, min(kk, s.shape[1]), dim=1)
                    top_r = top_r + i0
                    if best_s is not None and best_r is not None:
                        cand_s = torch.cat([best_s, top_s], dim=1)
                        sel_s, sel = torch.topk(cand_s, kk, dim=1)
                        best_r = torch.gather(torch.cat([best_r, top_r], dim=1), 1, sel)
                        best_s = sel_s
                    else:
                        best_s, best_r = top_s, top_r
                assert best_s is not None and best_r is not None
                scores.append(best_s.float().cpu())
                ids.append(self._ids[best_r].cpu())
        return _pad(torch.cat(scores).numpy(), torch.cat(ids).numpy(), k)


# --------------------------------------------------------------------------------------------
# FAISS


@dataclass(frozen=True)
class Recipe:
    """How an index is built and searched: a FAISS factory string plus its search-time knobs."""

    factory: str = "Flat"
    nprobe: int | None = None  # IVF: lists visited per query
    ef_search: int | None = None  # HNSW: candidate list size (must be >= k for full recall)
    k_factor: int | None = None  # RFlat/Refine: candidates re-ranked exactly = k_factor * k

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Recipe:
        def opt(name: str) -> int | None:
            return None if d.get(name) is None else int(d[name])

        return Recipe(factory=str(d.get("factory", "Flat")), nprobe=opt("nprobe"), ef_search=opt("ef_search"),
                      k_factor=opt("k_factor"))

    @property
    def kind(self) -> Literal["flat", "ivf", "hnsw", "other"]:
        f = self.factory.upper()
        if "IVF" in f:
            return "ivf"
        if "HNSW" in f:
            return "hnsw"
        if f in ("FLAT", "IDMAP,FLAT"):
            return "flat"
        return "other"


EXACT_MAX_ITEMS = 100_000


def choose_recipe(n_items: int, dim: int | None = None) -> Recipe:
    """Default recipe by catalogue size.

    Up to ~100k items exact search is both fastest to build and fast enough to query (100k x 64
    floats is a 25 MB scan). Beyond that an IVF index with about sqrt(N) lists: k-means on a
    sample trains in seconds even on 2 cores (unlike HNSW, whose build is minutes at 1M), and the
    reindex recall gate moves nprobe to the smallest setting whose recall@100 clears the floor.

    The lists hold float16 codes (SQfp16): an IVF scan is memory-bound, and float16 halves the
    bytes per scanned vector while keeping 3 significant digits of a cosine. Measured at 1M x 64
    (benchmarks/index.py and the serving benchmark's vectors): 1.2-2x faster than IVF1024,Flat at
    the same nprobe with the same recall@100. SQ8 is smaller still but costs recall.

    Why not more lists (FAISS's guide suggests 4-16 sqrt(N)): IVF2048 scanned less for the same
    recall on tightly clustered vectors (0.10 vs 0.14 ms per query at recall 0.99), but not on
    broad clusters (benchmarks/index.py: equal or slower at equal recall), and its k-means doubled
    the reindex job's CPU time at 1M (80 s against a 60 s wall-time target on 2 cores).
    """
    if n_items <= EXACT_MAX_ITEMS:
        return Recipe("Flat")
    nlist = 1 << int(round(math.log2(math.sqrt(n_items))))  # 1M -> 1024, 4M -> 2048
    nlist = max(256, min(nlist, 16384))
    return Recipe(f"IVF{nlist},SQfp16", nprobe=max(8, nlist // 32))


def _is_ivf(index: faiss.Index) -> bool:
    import faiss

    return faiss.try_extract_index_ivf(index) is not None


def _faiss_to_gpu(index: faiss.Index) -> faiss.Index:
    import faiss

    try:
        return faiss.index_cpu_to_all_gpus(index)
    except Exception as exc:  # e.g. HNSW has no GPU implementation: stay on CPU, say so once
        log.warning("index type %s cannot run on GPU (%s); searching on CPU", type(index).__name__, exc)
        return index


class FaissSearcher:
    """A FAISS inner-product index over int64 ids (``add_with_ids``).

    Indexes without native id support (Flat, HNSW, SQ, PQ) are wrapped in ``IndexIDMap``; IVF
    indexes store ids in their inverted lists directly.
    """

    def __init__(self, index: faiss.Index, recipe: Recipe, use_gpu: bool | None = None) -> None:
        self.recipe = recipe
        self._cpu_index = index
        self.dim = int(index.d)
        self.apply_params(recipe.nprobe, recipe.ef_search, recipe.k_factor)
        want_gpu = faiss_gpus() > 0 if use_gpu is None else use_gpu
        self.on_gpu = False
        self._index = index
        if want_gpu and faiss_gpus() > 0:
            self._index = _faiss_to_gpu(index)
            self.on_gpu = self._index is not index

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray, recipe: Recipe | str = "Flat", *,
              train_size: int | None = None, seed: int = 0, use_gpu: bool | None = None) -> FaissSearcher:
        """Build from (N, D) float32 vectors and (N,) int64 ids."""
        import faiss

        if isinstance(recipe, str):
            recipe = Recipe(recipe)
        vecs = _check_vectors(vectors, "item vectors")
        n, d = vecs.shape
        ids = _check_ids(ids, n)
        try:
            index = faiss.index_factory(d, recipe.factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise SearchError(f"invalid FAISS factory string {recipe.factory!r}: {_faiss_msg(exc)}") from exc
        if not _is_ivf(index) and not isinstance(index, faiss.IndexIDMap):
            index = faiss.IndexIDMap(index)  # Flat, HNSW, SQ, PQ store no ids of their own
        if not index.is_trained:
            # k-means cost grows with sample x lists; ~64 points per list is enough for good
            # centroids (FAISS warns below 39) and keeps training at 1M items to seconds.
            ivf = faiss.try_extract_index_ivf(index)
            default = 64 * ivf.nlist if ivf is not None else 65_536
            ts = min(n, train_size or max(default, 10_000))
            if ivf is not None and n < ivf.nlist:
                raise SearchError(f"recipe {recipe.factory!r} needs at least {ivf.nlist} items to train "
                                  f"its {ivf.nlist} lists; the catalogue has {n}")
            if ivf is not None:
                # 10 k-means iterations instead of FAISS's 25: the centroids barely move after
                # that, training is the largest cost of a 1M-item build on 2 cores, and the recall
                # gate measures (and nprobe compensates for) whatever quality is lost
                ivf.cp.niter = 10
            rng = np.random.default_rng(seed)
            sample = vecs if ts >= n else vecs[np.sort(rng.choice(n, ts, replace=False))]
            try:
                index.train(sample)
            except RuntimeError as exc:
                raise SearchError(f"cannot train {recipe.factory!r} on {len(sample)} vectors: "
                                  f"{_faiss_msg(exc)}") from exc
        try:
            index.add_with_ids(vecs, ids)
        except RuntimeError as exc:
            # wrappers around an IVF index (e.g. a refine stage) may not take ids themselves
            if "not implemented" not in str(exc) or index.ntotal:
                raise SearchError(f"cannot add vectors to {recipe.factory!r}: {_faiss_msg(exc)}") from exc
            index = faiss.IndexIDMap(index)
            index.add_with_ids(vecs, ids)
        return cls(index, recipe, use_gpu=use_gpu)

    @classmethod
    def load(cls, path: str | Path, recipe: Recipe | None = None, use_gpu: bool | None = None) -> FaissSearcher:
        import faiss

        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise SearchError(f"{path}: cannot read FAISS index: {_faiss_msg(exc)}") from exc
        return cls(index, recipe or Recipe(), use_gpu=use_gpu)

    def save(self, path: str | Path) -> None:
        import faiss

        # always the CPU copy: a bundle must load on machines without a GPU
        faiss.write_index(self._cpu_index, str(path))

    # -- search ------------------------------------------------------------------------------
    def apply_params(self, nprobe: int | None = None, ef_search: int | None = None,
                     k_factor: int | None = None) -> None:
        """Set search-time knobs; those that do not apply to this index type are ignored."""
        import faiss

        ps = faiss.ParameterSpace()
        if nprobe is not None:
            ivf = faiss.try_extract_index_ivf(self._cpu_index)
            if ivf is not None:
                ivf.nprobe = int(max(1, min(nprobe, ivf.nlist)))
                nprobe = int(ivf.nprobe)
        factory = self.recipe.factory.upper()
        if ef_search is not None and "HNSW" in factory:
            ps.set_index_parameter(self._cpu_index, "efSearch", int(ef_search))
        if k_factor is not None and ("RFLAT" in factory or "REFINE" in factory):
            ps.set_index_parameter(self._cpu_index, "k_factor_rf", int(k_factor))
        r = self.recipe
        self.recipe = Recipe(r.factory, nprobe if nprobe is not None else r.nprobe,
                             ef_search if ef_search is not None else r.ef_search,
                             k_factor if k_factor is not None else r.k_factor)
        gpu_index = getattr(self, "_index", None)
        if gpu_index is not None and gpu_index is not self._cpu_index and nprobe is not None:
            try:
                faiss.GpuParameterSpace().set_index_parameter(gpu_index, "nprobe", int(nprobe))
            except Exception as exc:  # pragma: no cover - needs faiss-gpu
                log.warning("cannot set nprobe on GPU index: %s", exc)

    @property
    def ntotal(self) -> int:
        return int(self._cpu_index.ntotal)

    @property
    def nlist(self) -> int | None:
        """Inverted lists of an IVF index (the most nprobe can scan), None for other indexes."""
        import faiss

        ivf = faiss.try_extract_index_ivf(self._cpu_index)
        return None if ivf is None else int(ivf.nlist)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = _check_queries(queries, self.dim, k)
        if self.ntotal == 0:
            return _pad(np.empty((q.shape[0], 0), np.float32), np.empty((q.shape[0], 0), np.int64), k)
        # GPU FAISS caps k (2048 on most builds); fall back to the CPU copy beyond that
        index = self._index if (not self.on_gpu or k <= 2048) else self._cpu_index
        scores, ids = index.search(q, int(k))
        scores = scores.astype(np.float32, copy=False)
        ids = ids.astype(np.int64, copy=False)
        scores[ids < 0] = _PAD_SCORE
        return scores, ids


def _faiss_msg(exc: BaseException) -> str:
    # FAISS errors carry a C++ stack; the first line that says what went wrong is enough
    text = str(exc).strip()
    for line in text.splitlines():
        if "Error" in line and ":" in line:
            return line.split("Error", 1)[-1].lstrip(": '").rstrip("' ")[:300]
    return text.splitlines()[0][:300] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# measurement


def search_users(searcher: Searcher, users: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Search for (B, D) user vectors, or (B, K, D) multi-interest users: each interest is a query
    and a user's lists are merged, an item scored by its best interest (towers' ranking score).

    Returns (scores, ids), (B, k) for single vectors; (B, K * k) for interests, best first, with an
    item found by several interests kept once (the rest padded: id -1, score -inf). Exact: an item
    in the user's top k by best interest is in its best interest's own top k (every item above it
    there is above it overall), so the first k kept are the top k over all the items.
    """
    q = np.ascontiguousarray(users, dtype=np.float32)
    if q.ndim == 2:
        return searcher.search(q, k)
    if q.ndim != 3:
        raise SearchError(f"user vectors must be (B, D) or (B, K, D), got shape {q.shape}")
    b, n_int, d = q.shape
    scores, ids = searcher.search(q.reshape(b * n_int, d), k)
    scores, ids = scores.reshape(b, n_int * k), ids.reshape(b, n_int * k)
    order = np.argsort(-scores, axis=1, kind="stable")  # best first; -inf padding last
    scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    # an id seen earlier in its row is a repeat with a lower (or equal) score: drop it
    by_id = np.argsort(ids, axis=1, kind="stable")  # equal ids keep their best-first order
    sid = np.take_along_axis(ids, by_id, 1)
    repeat = np.zeros_like(sid, dtype=bool)
    repeat[:, 1:] = (sid[:, 1:] == sid[:, :-1]) & (sid[:, 1:] >= 0)
    dup = np.zeros_like(repeat)
    np.put_along_axis(dup, by_id, repeat, 1)
    ids = np.where(dup, -1, ids)
    scores = np.where(dup, _PAD_SCORE, scores).astype(np.float32, copy=False)
    order = np.argsort(-scores, axis=1, kind="stable")  # the dropped repeats move to the end
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int | None = None) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / k (``faiss.contrib.evaluation``'s
    intersection measure); a -1 (missing result) in ``approx_ids`` is never a hit.

    Both arrays are (B, >=k) int64; with ``k`` None all columns are used. The exact results must
    be full (no -1): ask for k no larger than the catalogue.
    """
    from faiss.contrib.evaluation import knn_intersection_measure

    a = np.asarray(approx_ids)
    e = np.asarray(exact_ids)
    if a.ndim != 2 or e.ndim != 2 or a.shape[0] != e.shape[0]:
        raise ValueError(f"recall_at_k needs two (B, k) arrays with the same B, got {a.shape} and {e.shape}")
    k = min(a.shape[1], e.shape[1]) if k is None else k
    a, e = a[:, :k], e[:, :k]
    if a.shape != e.shape:
        raise ValueError(f"recall_at_k needs k={k} columns in both arrays, got {a.shape} and {e.shape}")
    if (e < 0).any():
        raise ValueError("the exact results have missing (-1) entries: ask for k <= the number of items")
    return float(knn_intersection_measure(a, e)) if a.size else 1.0


# --------------------------------------------------------------------------------------------
# id translation


class IdMap:
    """Catalogue item ids <-> the int64 ids stored in FAISS, plus item id <-> row position.

    When every catalogue id is a non-negative integer the FAISS id IS the item id (so logs and
    indexes read naturally); otherwise the FAISS id is the row position in ``item_vectors``.
    Saved as ``item_ids.json``: ``{"id_type": "int"|"str", "faiss_ids": "item_id"|"row", "ids": [...]}``.
    """

    def __init__(self, ids: Sequence[Any], id_type: Literal["int", "str"] | None = None) -> None:
        from towers.schema import item_ids_are_int

        raw = list(ids)
        if id_type is None:
            id_type = "int" if item_ids_are_int(raw) else "str"
        if id_type == "int":
            try:
                self.ids: list[ItemId] = [int(v) if isinstance(v, (int, np.integer)) else int(str(v).strip())
                                          for v in raw]
            except (TypeError, ValueError) as exc:
                raise SearchError(f"item ids are declared integers but one is not: {exc}") from exc
        elif id_type == "str":
            self.ids = [str(v) for v in raw]
        else:
            raise SearchError(f"unknown item id type {id_type!r}")
        self.id_type: Literal["int", "str"] = id_type
        self._row: dict[ItemId, int] = {}
        for r, v in enumerate(self.ids):
            if v in self._row:
                raise SearchError(f"duplicate item id {v!r} (rows {self._row[v]} and {r})")
            self._row[v] = r
        self.uses_item_ids = id_type == "int" and all(int(v) >= 0 for v in self.ids)
        if self.uses_item_ids:
            self.faiss_ids = np.asarray(self.ids, dtype=np.int64)
        else:
            self.faiss_ids = np.arange(len(self.ids), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item_id: object) -> bool:
        try:
            return self.parse(item_id) in self._row
        except (KeyError, ValueError):
            return False

    def lookup(self, item_id: Any) -> tuple[ItemId, int] | None:
        """(the id in the catalogue's type, its FAISS id) for a wire id, None when it is not in the
        catalogue (or cannot be an id of it). One parse and one dict lookup: the request path
        calls this for every history, event and seen item."""
        try:
            v = self.parse(item_id)
        except (ValueError, TypeError):
            return None
        r = self._row.get(v)
        if r is None:
            return None
        return v, (v if self.uses_item_ids else r)  # type: ignore[return-value]

    def parse(self, item_id: Any) -> ItemId:
        """A wire id (7, "7", " 7 ") in the catalogue's type; ValueError when it cannot be one."""
        if self.id_type == "int":
            if type(item_id) is int:  # the common case, first: no bool/float/str checks
                return item_id
            if isinstance(item_id, bool):
                raise ValueError("an item id cannot be a boolean")
            if isinstance(item_id, (int, np.integer)):
                return int(item_id)
            if isinstance(item_id, float) and item_id.is_integer():
                return int(item_id)
            s = str(item_id).strip()
            try:
                return int(s)
            except ValueError:
                raise ValueError(f"item id {item_id!r} is not an integer (this catalogue uses integer ids)") from None
        return str(item_id).strip() if not isinstance(item_id, str) else item_id

    def row_of(self, item_id: Any) -> int:
        """Row of an item in item_vectors; KeyError for an unknown item."""
        key = self.parse(item_id)
        try:
            return self._row[key]
        except KeyError:
            raise KeyError(f"unknown item id {item_id!r}") from None

    def rows_of(self, item_ids: Iterable[Any], missing: int = -1) -> np.ndarray:
        out = []
        for v in item_ids:
            try:
                out.append(self._row[self.parse(v)])
            except (KeyError, ValueError):
                out.append(missing)
        return np.asarray(out, dtype=np.int64)

    def faiss_id_of(self, item_id: Any) -> int:
        return int(self.faiss_ids[self.row_of(item_id)])

    def to_rows(self, faiss_ids: np.ndarray) -> np.ndarray:
        """FAISS ids (any shape) -> row positions, -1 stays -1."""
        f = np.asarray(faiss_ids, dtype=np.int64)
        if not self.uses_item_ids:
            return f.copy()
        out = np.full(f.shape, -1, dtype=np.int64)
        valid = f >= 0
        out[valid] = [self._row[int(x)] for x in f[valid]]
        return out

    def to_items(self, faiss_ids: np.ndarray) -> list[ItemId]:
        """A 1-D array of FAISS ids -> catalogue ids in the catalogue's type, skipping -1."""
        f = np.asarray(faiss_ids, dtype=np.int64).ravel()
        f = f[f >= 0].tolist()  # one C call instead of int() per element (~10x faster for 100 ids)
        if self.uses_item_ids:
            return f
        ids = self.ids
        return [ids[x] for x in f]

    def to_dict(self) -> dict[str, Any]:
        return {"id_type": self.id_type, "faiss_ids": "item_id" if self.uses_item_ids else "row",
                "ids": self.ids}

    def save(self, path: str | Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, separators=(",", ":"))

    @staticmethod
    def load(path: str | Path) -> IdMap:
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise SearchError(f"{path}: cannot read id map: {exc}") from exc
        if not isinstance(d, dict) or not isinstance(d.get("ids"), list):
            raise SearchError(f"{path}: id map must be an object with a list 'ids'")
        m = IdMap(d["ids"], d.get("id_type"))
        declared = d.get("faiss_ids")
        if declared is not None and declared != ("item_id" if m.uses_item_ids else "row"):
            raise SearchError(f"{path}: id map says FAISS ids are {declared!r}, which does not fit its ids")
        return m
