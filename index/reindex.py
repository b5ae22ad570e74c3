"""The batch reindex job: embed the catalogue, build the index, gate on recall, publish a bundle.

    run(ReindexConfig(artifacts=...)) -> Manifest

Reads ``models/<v>/model.pt`` and ``models/<v>/data/{items,users,interactions}.parquet`` (written by
the training job). ``items`` (CSV or Parquet: ``item_id`` + the model's item feature columns) adds
items to the catalogue or replaces the features of existing ones; an id the model never saw is
embedded from its content features alone (row 0 of the id table), so new items become searchable
without retraining. Nothing is published unless the index reaches ``recall_floor`` recall@k against
exact search for real users' vectors.

``run`` is a list of stage calls, each a function with its inputs and outputs in its signature:
``load_model`` -> ``load_inputs`` -> ``embed_catalogue`` -> ``build_index`` -> ``recall_gate`` ->
``write_bundle`` and ``publish`` (index.bundle); ``StageClock`` records each stage's wall and CPU time
in the manifest (``timings_s``, ``cpu_s``).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field

from index.bundle import (
    DEFAULT_KEEP,
    BundleError,
    Manifest,
    publish,
    staging_dir,
    write_bundle,
)
from index.searcher import (
    ExactSearcher,
    FaissSearcher,
    IdMap,
    Recipe,
    SearchError,
    choose_recipe,
    faiss_gpus,
    recall_at_k,
    set_threads,
    torch_cuda_available,
)
from towers.artifacts import DEFAULT_REDIS_PREFIX, new_version, resolve_model_dir
from towers.neighbours import Neighbours, consecutive_pairs, weight_of
from towers.schema import DataError, conform_table, normalize_user_id, read_table_with_lines
from towers.validation import JobConfig, PositiveInt, UnitInterval

if TYPE_CHECKING:
    import pandas as pd  # imported where the job reads tables: `twotower --help` and serve need no pandas

    from towers.checkpoint import TwoTowerModel

log = logging.getLogger(__name__)


class ReindexConfig(JobConfig):
    """Every setting of the reindex job with its default and its constraint (towers.validation)."""

    artifacts: str | Path = "artifacts"
    model_version: str | None = None  # None: the version named in models/LATEST
    items: str | Path | None = None  # extra/updated catalogue rows (csv or parquet)
    factory: str | None = None  # FAISS factory string; None: choose_recipe(n_items)
    nprobe: PositiveInt | None = None  # IVF; None: the smallest that clears the recall floor
    ef_search: PositiveInt | None = None  # HNSW; None: the smallest that clears the recall floor
    recall_floor: UnitInterval = 0.95
    recall_k: PositiveInt = 100
    keep: PositiveInt = DEFAULT_KEEP  # bundles kept for rollback
    redis_url: str | None = None  # None/"": no notification (services still poll CURRENT)
    redis_prefix: str = DEFAULT_REDIS_PREFIX
    n_eval_users: PositiveInt = 1000  # users whose vectors measure recall
    batch_size: PositiveInt = 65536  # items per item-tower forward pass
    popular_cap: PositiveInt = 10_000  # length of the popularity fallback list
    seed: int = 0
    threads: PositiveInt | None = None  # FAISS OpenMP threads; None: the CPUs we may use
    use_gpu: bool | None = None  # None: when one is there
    publish: bool = True  # False: build and validate the staged bundle only (benchmarks)
    extra: dict[str, Any] = Field(default_factory=dict)  # copied into the manifest


@dataclass
class RecallReport:
    recall: float
    k: int
    n_queries: int
    recipe: Recipe
    tried: list[tuple[int, float]]  # (nprobe or efSearch, recall) for every setting measured


# --------------------------------------------------------------------------------------------
# inputs


def _read_parquet(path: Path, what: str) -> pd.DataFrame:
    import pandas as pd
    if not path.is_file():
        raise DataError(f"{what} not found (the training job writes it next to model.pt)", path=path)
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises many types
        raise DataError(f"cannot read parquet: {exc}", path=path) from exc


def load_catalogue(model: TwoTowerModel, base: pd.DataFrame, base_path: Path,
                   extra_path: str | Path | None) -> tuple[pd.DataFrame, int]:
    """The training catalogue plus the rows of ``extra_path`` (new ids appended, known ids replaced).

    Returns (catalogue indexed by item id, number of rows that came from ``extra_path``).
    """
    import pandas as pd
    enc = model.encoder
    specs = enc.item_features
    missing = [s.name for s in specs if s.name not in base.columns]
    if missing:
        raise DataError(f"missing feature column(s) {', '.join(map(repr, missing))} the model needs", path=base_path)
    if base.index.has_duplicates:
        dup = base.index[base.index.duplicated()][0]
        raise DataError(f"duplicate item id {dup!r}", path=base_path)
    base = base[[s.name for s in specs]]
    if extra_path is None:
        return base, 0

    df, where = read_table_with_lines(extra_path, text_columns=["item_id"])
    if "item_id" not in df.columns:
        raise DataError(f"no item_id column (columns: {', '.join(map(str, df.columns))})", path=extra_path,
                        column="item_id")
    by_row = str(extra_path).lower().endswith((".parquet", ".pq"))

    def at(i: int) -> dict[str, int]:
        return {"row": int(where[i])} if by_row else {"line": int(where[i])}

    raw = df["item_id"]
    blank = raw.isna() | (raw.astype(str).str.strip() == "")
    if blank.any():
        raise DataError("empty item id", path=extra_path, column="item_id", **at(int(np.flatnonzero(blank)[0])))
    if enc.item_id_is_int:
        ids: list[Any] = []
        for i, v in enumerate(raw):
            try:
                ids.append(enc.normalize_item_id(v))
            except (TypeError, ValueError):
                raise DataError(f"item id {v!r} is not an integer (this catalogue uses integer ids)",
                                path=extra_path, column="item_id", **at(i)) from None
    else:
        ids = [str(v).strip() for v in raw]
    seen: dict[Any, int] = {}
    for i, v in enumerate(ids):
        if v in seen:
            first = where[seen[v]]
            raise DataError(f"duplicate item id {v!r} (first at {'row' if by_row else 'line'} {first})",
                            path=extra_path, column="item_id", **at(i))
        seen[v] = i
    feats = df.drop(columns=["item_id"])
    feats.index = pd.RangeIndex(len(feats))
    try:
        conformed = conform_table(feats, specs, path=extra_path)
    except DataError as exc:
        # conform_table counts lines as if the file had no blank lines; name the real line/row
        if exc.line is not None and 0 <= exc.line - 2 < len(where) and exc.column is not None:
            msg = str(exc).rsplit(": ", 1)[-1]
            raise DataError(msg, path=extra_path, column=exc.column, **at(exc.line - 2)) from None
        raise
    conformed.index = pd.Index(ids, name=base.index.name or "item_id")
    if enc.item_id_is_int:
        conformed.index = conformed.index.astype("int64")
    replaced = base.index.isin(conformed.index)
    catalogue = pd.concat([base.loc[~replaced], conformed])
    return catalogue, len(conformed)


def user_histories(interactions: pd.DataFrame, history_len: int, id_is_int: bool
                   ) -> tuple[dict[str, list[Any]], dict[str, set[Any]]]:
    """Each user's last ``history_len`` items (oldest first) and every item they interacted with."""
    if interactions.empty:
        return {}, {}
    df = interactions[["user_id", "item_id", "timestamp"]].copy()
    df["user_id"] = df["user_id"].map(normalize_user_id)
    # stable sort: equal timestamps keep log order, so "the latest" is the one written last
    df = df.sort_values(["user_id", "timestamp"], kind="stable")
    conv = int if id_is_int else str
    hist: dict[str, list[Any]] = {}
    seen: dict[str, set[Any]] = {}
    for uid, items in df.groupby("user_id", sort=False)["item_id"]:
        vals = [conv(v) for v in items.tolist()]
        hist[str(uid)] = vals[-history_len:] if history_len > 0 else []
        seen[str(uid)] = set(vals)
    return hist, seen


def item_neighbours(interactions: pd.DataFrame, catalogue: pd.Index) -> Neighbours:
    """The last item's neighbour table (towers.neighbours) over the catalogue's rows: pairs of items
    each user had one right after the other, users' rows in the order ``user_histories`` reads them."""
    import pandas as pd

    rows = catalogue.get_indexer(interactions["item_id"])  # -1: not in the catalogue (dropped)
    users = pd.factorize(interactions["user_id"].map(normalize_user_id))[0]
    src, dst = consecutive_pairs(users, rows, interactions["timestamp"].to_numpy())
    return Neighbours.from_pairs(src, dst, len(catalogue))


def popularity(interactions: pd.DataFrame, catalogue: pd.Index, cap: int, id_is_int: bool) -> list[Any]:
    """Catalogue items by interaction weight (ties: more interactions, then id), most popular first."""
    conv = int if id_is_int else str
    if interactions.empty:
        return [conv(v) for v in catalogue[:cap]]
    df = interactions[["item_id", "weight"]] if "weight" in interactions.columns else \
        interactions[["item_id"]].assign(weight=1.0)
    g = df.groupby("item_id")["weight"].agg(["sum", "count"])
    g = g[g.index.isin(catalogue)]
    g = g.reset_index().sort_values(["sum", "count", "item_id"], ascending=[False, False, True], kind="stable")
    return [conv(v) for v in g["item_id"].head(cap)]


# --------------------------------------------------------------------------------------------
# recall gate


def measure_recall(searcher: FaissSearcher, truth_ids: np.ndarray, queries: np.ndarray, k: int,
                   floor: float, tune_nprobe: bool, tune_ef: bool) -> RecallReport:
    """recall@k of ``searcher`` against ``truth_ids``; when allowed, move nprobe (IVF) or efSearch
    (HNSW) step by step to the smallest setting that clears ``floor``.

    nprobe is the search cost of an IVF index (lists scanned per query), so it is searched both
    ways: doubled from the starting value while recall is below the floor, or halved while the
    floor still holds. The serving index then scans no more lists than the floor needs."""
    recipe = searcher.recipe
    tried: list[tuple[int, float]] = []

    def measure() -> float:
        _, got = searcher.search(queries, k)
        return recall_at_k(got, truth_ids, k)

    r = measure()
    if recipe.kind == "ivf" and tune_nprobe:
        nlist = searcher.nlist or 1
        nprobe = searcher.recipe.nprobe or 1
        tried.append((nprobe, r))
        while r < floor and nprobe < nlist:
            nprobe = min(nlist, nprobe * 2)
            searcher.apply_params(nprobe=nprobe)
            r = measure()
            tried.append((nprobe, r))
        if r >= floor and len(tried) == 1:  # the start already clears it: try cheaper settings
            while nprobe > 1:
                lower = nprobe // 2
                searcher.apply_params(nprobe=lower)
                r_lower = measure()
                tried.append((lower, r_lower))
                if r_lower < floor:
                    searcher.apply_params(nprobe=nprobe)
                    break
                nprobe, r = lower, r_lower
    elif recipe.kind == "hnsw" and tune_ef:
        ef = searcher.recipe.ef_search or max(k, 64)
        searcher.apply_params(ef_search=ef)
        r = measure()
        tried.append((ef, r))
        while r < floor and ef < 4096:
            ef *= 2
            searcher.apply_params(ef_search=ef)
            r = measure()
            tried.append((ef, r))
    return RecallReport(recall=r, k=k, n_queries=len(queries), recipe=searcher.recipe, tried=tried)


# --------------------------------------------------------------------------------------------
# the job


class StageClock:
    """Wall and CPU seconds of each stage of a run (CPU time is what a shared machine does not distort)."""

    def __init__(self) -> None:
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        self._t, self._c = self.t0, self.c0
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        t, c = time.perf_counter(), time.process_time()
        self.wall[stage], self.cpu[stage] = round(t - self._t, 3), round(c - self._c, 3)
        self._t, self._c = t, c

    def total(self) -> tuple[dict[str, float], dict[str, float]]:
        wall = {**self.wall, "total": round(time.perf_counter() - self.t0, 3)}
        return wall, {**self.cpu, "total": round(time.process_time() - self.c0, 3)}


@dataclass
class Inputs:
    """What the training job left for this model version, plus the extra catalogue rows."""

    catalogue: pd.DataFrame  # indexed by item id: the model's item feature columns
    users: pd.DataFrame  # indexed by normalised user id
    interactions: pd.DataFrame  # user_id, item_id, timestamp (, weight)
    n_extra: int  # catalogue rows that came from cfg.items
    items_path: Path  # the training catalogue (named in errors)


@dataclass
class Embedded:
    vectors: np.ndarray  # (N, D) float32, row r = catalogue row r
    id_map: IdMap
    n_cold: int  # items the model never saw (embedded from content only)


@dataclass
class Gate:
    report: RecallReport
    queries: int
    source: str  # what the queries are ("users", or item vectors when the log has none)
    reference: str  # what the ground truth came from


def load_model(artifacts: Path, version: str | None, use_gpu: bool | None) -> tuple[TwoTowerModel, Path, str]:
    """(model, its version directory, its version); on CUDA when there is one and it is allowed."""
    from towers.checkpoint import load_checkpoint

    model_dir, model_version = resolve_model_dir(artifacts, version)
    model = load_checkpoint(model_dir / "model.pt")
    if torch_cuda_available() and use_gpu is not False:
        for tower in (model.user_tower, model.item_tower):
            if tower is not None:
                tower.to("cuda")
    return model, model_dir, model_version


def load_inputs(model: TwoTowerModel, model_dir: Path, extra_items: str | Path | None) -> Inputs:
    """The data snapshot beside model.pt and the catalogue with ``extra_items`` merged in."""
    data = model_dir / "data"
    items_path = data / "items.parquet"
    base = _read_parquet(items_path, "catalogue")
    users = _read_parquet(data / "users.parquet", "user table")
    interactions = _read_parquet(data / "interactions.parquet", "interaction log")
    for col in ("user_id", "item_id", "timestamp"):
        if col not in interactions.columns:
            raise DataError(f"interaction log lacks column {col!r}", path=data / "interactions.parquet", column=col)
    users.index = users.index.map(normalize_user_id)
    catalogue, n_extra = load_catalogue(model, base, items_path, extra_items)
    if catalogue.empty:
        raise DataError("the catalogue has no items", path=items_path)
    return Inputs(catalogue, users, interactions, n_extra, items_path)


def embed_catalogue(model: TwoTowerModel, inputs: Inputs, batch_size: int, model_path: Path,
                    extra_items: str | Path | None) -> Embedded:
    """Every item's vector; ids the model never saw are embedded from content only (cold start)."""
    catalogue = inputs.catalogue
    vectors = model.embed_items(catalogue, batch_size=batch_size)  # (N, D)
    if vectors.shape != (len(catalogue), model.dim):
        raise BundleError(f"item tower returned shape {vectors.shape}, expected ({len(catalogue)}, {model.dim})")
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        first = catalogue.index[int(np.flatnonzero(bad)[0])]
        first = first.item() if isinstance(first, np.generic) else first
        raise BundleError(f"the item tower produced NaN/inf vectors for {int(bad.sum())} item(s), first "
                          f"item {first!r}; the model checkpoint {model_path} is broken")
    id_is_int = model.encoder.item_id_is_int
    try:
        id_map = IdMap(list(catalogue.index), "int" if id_is_int else "str")
    except SearchError as exc:
        raise DataError(str(exc), path=extra_items or inputs.items_path) from exc
    n_cold = int((model.encoder.item_rows(catalogue.index) == 0).sum())
    return Embedded(vectors, id_map, n_cold)


def build_index(emb: Embedded, dim: int, cfg: ReindexConfig) -> FaissSearcher:
    """The FAISS index over the item vectors: cfg.factory, else the recipe for the catalogue size."""
    if cfg.factory:
        recipe = Recipe(cfg.factory, cfg.nprobe, cfg.ef_search)
    else:
        auto = choose_recipe(len(emb.vectors), dim)
        recipe = Recipe(auto.factory, cfg.nprobe or auto.nprobe, cfg.ef_search or auto.ef_search)
    return FaissSearcher.build(emb.vectors, emb.id_map.faiss_ids, recipe, seed=cfg.seed, use_gpu=cfg.use_gpu)


def recall_gate(searcher: FaissSearcher, emb: Embedded, model: TwoTowerModel, inputs: Inputs,
                hist: dict[str, list[Any]], cfg: ReindexConfig) -> Gate:
    """recall@k of the index against exact search for real users' vectors, tuning nprobe/efSearch
    when they were not given; BundleError (nothing is published) below ``cfg.recall_floor``."""
    queries, source = _eval_queries(model, inputs.users, hist, emb.vectors, cfg)
    k = min(cfg.recall_k, len(emb.vectors))
    if searcher.recipe.kind == "flat" and len(emb.vectors) > 5_000:
        # the index is itself FAISS's exact flat search: a second exact pass would cost as much
        # again and could only agree (small catalogues are still checked against ExactSearcher)
        truth = searcher.search(queries, k)[1]
        reference = "the flat index itself (exact)"
    else:
        truth = ExactSearcher(emb.vectors, emb.id_map.faiss_ids).search(queries, k)[1]
        reference = "exact search"
    report = measure_recall(searcher, truth, queries, k, cfg.recall_floor,
                            tune_nprobe=cfg.nprobe is None, tune_ef=cfg.ef_search is None)
    log.info("recall@%d of %s = %.4f over %d %s (tried %s)", k, _describe(report.recipe), report.recall,
             len(queries), source, report.tried or "-")
    if report.recall < cfg.recall_floor:
        raise BundleError(f"recall@{k} of {_describe(report.recipe)} is {report.recall:.4f} over {len(queries)} "
                          f"{source}, below the floor {cfg.recall_floor}; not publishing (raise --nprobe/"
                          f"--ef-search, pick another --factory, or lower --recall-floor)")
    return Gate(report, len(queries), source, reference)


def run(cfg: ReindexConfig) -> Manifest:
    """Embed, index, gate, write and (unless ``cfg.publish`` is False) publish. Returns the manifest.

    Raises DataError/BundleError (ValueError) for bad input or a failed recall gate; nothing is
    published then and the current bundle stays current.
    """
    clock = StageClock()
    threads = set_threads(cfg.threads)
    artifacts = Path(cfg.artifacts)
    model, model_dir, model_version = load_model(artifacts, cfg.model_version, cfg.use_gpu)
    clock.lap("load_model")
    inputs = load_inputs(model, model_dir, cfg.items)
    clock.lap("load_data")
    emb = embed_catalogue(model, inputs, cfg.batch_size, model_dir / "model.pt", cfg.items)
    clock.lap("embed_items")
    searcher = build_index(emb, model.dim, cfg)
    clock.lap("build_index")
    id_is_int = model.encoder.item_id_is_int
    hist, seen = user_histories(inputs.interactions, model.encoder.history_len, id_is_int)
    gate = recall_gate(searcher, emb, model, inputs, hist, cfg)
    clock.lap("recall_gate")

    popular = popularity(inputs.interactions, inputs.catalogue.index, cfg.popular_cap, id_is_int)
    weight = weight_of(model.meta, str(model_dir / "model.pt"))  # chosen by the training job (training/blend.py)
    neighbours = item_neighbours(inputs.interactions, inputs.catalogue.index) if weight > 0 else None
    version = new_version()
    staged = staging_dir(artifacts, version)
    extra = {"threads": threads, "faiss_gpus": faiss_gpus(), "n_extra_items": inputs.n_extra,
             "items_path": str(cfg.items) if cfg.items else None, "eval_queries": gate.source,
             "recall_reference": gate.reference, "recall_tried": gate.report.tried, **cfg.extra}
    try:
        manifest = write_bundle(
            staged, index_version=version, model_version=model_version, model_path=model_dir / "model.pt",
            searcher=searcher, id_map=emb.id_map, item_vectors=emb.vectors, popular=popular, users=inputs.users,
            histories=hist, seen=seen, recall=gate.report.recall, recall_k=gate.report.k,
            n_eval_users=gate.queries, history_len=model.encoder.history_len, n_cold_items=emb.n_cold,
            extra=extra, neighbours=neighbours, neighbour_weight=weight)
        clock.lap("write_bundle")
        if cfg.publish:
            publish(artifacts, staged, keep=cfg.keep, redis_url=cfg.redis_url, prefix=cfg.redis_prefix)
            clock.lap("publish")
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    manifest.extra["timings_s"], manifest.extra["cpu_s"] = clock.total()
    log.info("bundle %s: %d items (%d cold), dim %d, %s, recall@%d %.4f, %.1fs", version, manifest.n_items,
             emb.n_cold, manifest.dim, _describe(gate.report.recipe), gate.report.k, gate.report.recall,
             manifest.extra["timings_s"]["total"])
    if not cfg.publish:
        manifest.extra["staged_dir"] = str(staged)
    return manifest


def _eval_queries(model: TwoTowerModel, users: pd.DataFrame, hist: dict[str, list[Any]],
                  vectors: np.ndarray, cfg: ReindexConfig) -> tuple[np.ndarray, str]:
    """(Q, D) query vectors for the recall gate: real users from the interaction log, embedded with
    the user tower as the service would (each of a multi-interest user's vectors is a query); item
    vectors only when the log has no users."""
    rng = np.random.default_rng(cfg.seed)
    uids = sorted(hist)
    if uids:
        if len(uids) > cfg.n_eval_users:
            uids = [uids[i] for i in np.sort(rng.choice(len(uids), cfg.n_eval_users, replace=False))]
        feats = users.reindex(uids)
        vecs = model.embed_users(uids, feats, [hist[u] for u in uids])  # (Q, D), or (Q, K, D) interests
        # every interest is a query the service sends: the gate measures them all
        return vecs.reshape(-1, vecs.shape[-1]), "users" if vecs.ndim == 2 else f"users x {vecs.shape[1]} interests"
    n = min(cfg.n_eval_users, len(vectors))
    return vectors[np.sort(rng.choice(len(vectors), n, replace=False))], "item vectors (no users in the log)"


def _describe(recipe: Recipe) -> str:
    knobs = []
    if recipe.nprobe is not None and recipe.kind == "ivf":
        knobs.append(f"nprobe={recipe.nprobe}")
    if recipe.ef_search is not None and recipe.kind == "hnsw":
        knobs.append(f"efSearch={recipe.ef_search}")
    return recipe.factory + (f" ({', '.join(knobs)})" if knobs else "")
