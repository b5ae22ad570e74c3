"""Interactions larger than memory: a directory of Parquet (or CSV) part files, or one large file,
read in chunks with ``pyarrow.dataset``; the examples are produced one shard of users at a time.

Layout (``--data csv:DIR``): ``DIR/interactions/`` holds the part files (``*.parquet`` or ``*.csv``,
read in name order), ``DIR/users.*`` and ``DIR/items.*`` are the optional side tables, which are
loaded whole: they are the size of the tables the model holds anyway. ``--stream`` reads a single
large ``DIR/interactions.csv`` (or ``.parquet``) the same way.

One pass over the interactions (rank 0, ``partition``) validates and cleans each chunk as the
in-memory loader does (errors name the file, row and column), collects the user and item
vocabularies, and writes every row into one of S shard files by a hash of its user id, so a shard
holds ALL interactions of its users. Everything after that works on one shard at a time, whose size
the ``shard_rows`` setting bounds:

- the per-user leave-last-out split is ``training.data.split_leave_last_out`` on the shard (its
  users are all there, with their rows in log order), so it means exactly what it means in memory:
  per user, by (timestamp, position in the log), the last row is the test target, the one before
  the validation target, users with fewer than 3 rows train on all of them;
- exact duplicate (user, item, timestamp) rows are dropped per shard, the first kept, as in memory;
- the examples of a shard are built, shuffled and cut into batches by ``ShardBatches``, the
  ``DataLoader`` dataset of each rank, which reads only the shards of its rank.

Validation and the final test score a sample of users (``eval_users``, drawn by hash from rank
0's shards) with the same evaluator as in-memory data: full catalogue, seen items masked.
Peak memory is the tables, the vocabularies, one shard and the batch, whatever the number of rows.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from towers.artifacts import atomic_open, atomic_write_json
from towers.schema import DataError, FeatureSpec, is_parquet
from training.data import (
    _WHERE,
    RecData,
    Split,
    _as_item_ids,
    _check_unique,
    _drop,
    _find_table,
    _id_text,
    _read_side_table,
    _require_columns,
    _sorted_user_index,
    _Source,
    _timestamps,
    _weights,
    infer_feature_columns,
    split_leave_last_out,
)
from training.memory import release_freed_memory
from training.pipeline import EpochBatches, Examples, examples_from_rows, lap_order, take

log = logging.getLogger(__name__)

SHARD_COLUMNS = ["user_id", "item_text", "timestamp", "weight", "seq"]
_HASH_MOD = np.uint64(1_000_003)


@dataclass
class StreamSource:
    directory: Path
    files: list[Path]          # interaction files in read order
    fmt: str                   # "parquet" | "csv"
    users_path: Path | None
    items_path: Path | None


def stream_source(directory: str | Path, force: bool = False) -> StreamSource | None:
    """The streamed layout of ``csv:DIR`` if it has one (``interactions/`` is a directory, or ``force``
    with a single interactions file), else None (the in-memory loader reads it)."""
    d = Path(directory).expanduser()
    parts = d / "interactions"
    if parts.is_dir():
        files = sorted(p for p in parts.iterdir() if p.is_file() and p.suffix.lower() in (".parquet", ".pq", ".csv"))
        if not files:
            raise DataError("no *.parquet or *.csv part files", path=parts)
        kinds = {"parquet" if is_parquet(p) else "csv" for p in files}
        if len(kinds) > 1:
            raise DataError("mixed Parquet and CSV part files; keep one format", path=parts)
        fmt = kinds.pop()
    elif force:
        single = _find_table(d, "interactions", required=True)
        assert single is not None
        files, fmt = [single], ("parquet" if is_parquet(single) else "csv")
    else:
        return None
    return StreamSource(d, files, fmt, _find_table(d, "users", required=False), _find_table(d, "items", required=False))


def user_hash(user_ids: np.ndarray) -> np.ndarray:
    """A stable hash of user id strings (the same in every process and run)."""
    return pd.util.hash_array(np.asarray(user_ids, dtype=object), categorize=False)


# ------------------------------------------------------------------------------------------------
# the one pass over the interactions


@dataclass
class Partitioned:
    """What ``partition`` leaves in its directory (``meta.json`` + the side tables), enough for every
    rank to rebuild the encoder and read its shards."""

    dir: Path
    shards: int
    rows: int                              # rows kept after cleaning
    item_id_is_int: bool
    dropped: dict[str, int] = field(default_factory=dict)
    specs: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # feature specs by side

    def shard_dir(self, s: int) -> Path:
        return self.dir / f"shard={s}"

    def save(self) -> None:
        atomic_write_json(self.dir / "meta.json", {"shards": self.shards, "rows": self.rows,
                                                   "item_id_is_int": self.item_id_is_int,
                                                   "dropped": self.dropped, "specs": self.specs})

    @classmethod
    def load(cls, d: Path) -> Partitioned:
        m = json.loads((d / "meta.json").read_text())
        return cls(d, int(m["shards"]), int(m["rows"]), bool(m["item_id_is_int"]), dict(m["dropped"]),
                   dict(m.get("specs", {})))


def _read_format(src: StreamSource) -> Any:
    if src.fmt == "parquet":
        return "parquet"
    import pyarrow.csv as pacsv

    # every column as text: ids keep their spelling ("007"), and a later block cannot disagree with
    # the type guessed from the first; the validators below parse and report
    names = pads.dataset([str(f) for f in src.files], format="csv").schema.names
    return pads.CsvFileFormat(convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                                    strings_can_be_null=True))


def read_chunks(src: StreamSource, chunk_rows: int) -> Iterator[tuple[pd.DataFrame, _Source]]:
    """Each file in order, ``chunk_rows`` at a time, with the 1-based row of every row in its file."""
    fmt = _read_format(src)
    for path in src.files:
        frag_ds = pads.dataset(str(path), format=fmt)
        cols = frag_ds.schema.names
        if _WHERE in cols:
            raise DataError(f"column name {_WHERE!r} is reserved", path=path, column=_WHERE)
        offset = 0
        for batch in frag_ds.to_batches(batch_size=chunk_rows, use_threads=False):
            if batch.num_rows == 0:
                continue
            df = batch.to_pandas()
            df.columns = [str(c).strip() for c in df.columns]
            df[_WHERE] = np.arange(offset + 1, offset + 1 + len(df), dtype=np.int64)
            offset += len(df)
            yield df, _Source(path, by_row=True)


def _clean(raw: pd.DataFrame, src: _Source, dropped: dict[str, int]) -> pd.DataFrame:
    _require_columns(raw, ["user_id", "item_id", "timestamp"], src)
    inter = pd.DataFrame({
        "user_id": _id_text(raw, "user_id", src),
        "item_text": _id_text(raw, "item_id", src),
        "timestamp": _timestamps(raw, "timestamp", src),
        "weight": _weights(raw, "weight", src) if "weight" in raw.columns else 1.0,
        _WHERE: raw[_WHERE].to_numpy(),
    })
    return _drop(inter, (inter["weight"] <= 0).to_numpy(), "weight <= 0", src, dropped)


class _Uniques:
    """Distinct strings seen so far, as Arrow arrays merged now and then (memory ~ the vocabulary)."""

    def __init__(self) -> None:
        self.parts: list[pa.Array] = []
        self.pending = 0

    def add(self, values: np.ndarray) -> None:
        import pyarrow.compute as pc

        arr = pc.unique(pa.array(values, type=pa.string()))
        self.parts.append(arr)
        self.pending += len(arr)
        if len(self.parts) > 8:
            self.parts = [self.result()]

    def result(self) -> pa.Array:
        import pyarrow.compute as pc

        if not self.parts:
            return pa.array([], type=pa.string())
        return pc.unique(pa.concat_arrays(self.parts))


def count_rows(src: StreamSource) -> int:
    return int(pads.dataset([str(f) for f in src.files], format=_read_format(src)).count_rows())


def partition(src: StreamSource, dest: Path, shards: int, chunk_rows: int = 1_000_000) -> tuple[Partitioned, pa.Array, pa.Array]:
    """Read every interaction once: clean, collect vocabularies, write each row to its user's shard.

    Returns the partition and the distinct user ids and item ids (as text) of the interactions.
    """
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    dropped: dict[str, int] = {}
    users, items = _Uniques(), _Uniques()
    stats = {"rows": 0, "all_int": True}
    schema = pa.schema([("user_id", pa.string()), ("item_text", pa.string()), ("timestamp", pa.int64()),
                        ("weight", pa.float64()), ("seq", pa.int64()), ("shard", pa.int32())])

    def batches() -> Iterator[pa.RecordBatch]:
        for raw, source in read_chunks(src, chunk_rows):
            inter = _clean(raw, source, dropped)
            if inter.empty:
                continue
            uid = inter["user_id"].to_numpy(dtype=object)
            itext = inter["item_text"].to_numpy(dtype=object)
            users.add(uid)
            items.add(itext)
            if stats["all_int"]:
                stats["all_int"] = bool(pd.Series(itext, dtype=object).str.fullmatch(r"-?\d{1,18}").all())
            n = len(inter)
            seq = np.arange(stats["rows"], stats["rows"] + n, dtype=np.int64)  # position in the log
            stats["rows"] += n
            shard = (user_hash(uid) % np.uint64(shards)).astype(np.int32)
            yield pa.RecordBatch.from_arrays(
                [pa.array(uid, type=pa.string()), pa.array(itext, type=pa.string()),
                 pa.array(inter["timestamp"].to_numpy(np.int64)), pa.array(inter["weight"].to_numpy(np.float64)),
                 pa.array(seq), pa.array(shard)], schema=schema)

    pads.write_dataset(batches(), dest, schema=schema, format="parquet", partitioning=["shard"],
                       partitioning_flavor="hive", existing_data_behavior="overwrite_or_ignore",
                       max_rows_per_group=1 << 18, min_rows_per_group=1 << 15, max_open_files=1024)
    if stats["rows"] == 0:
        raise DataError(f"no interactions left after cleaning ({dropped})", path=src.files[0].parent)
    part = Partitioned(dest, shards, int(stats["rows"]), bool(stats["all_int"]), dropped)
    part.save()
    return part, users.result(), items.result()


# ------------------------------------------------------------------------------------------------
# the catalogue and the user table


def side_tables(src: StreamSource, user_ids: pa.Array, item_texts: pa.Array, as_int: bool
                ) -> tuple[pd.DataFrame, list[FeatureSpec], pd.DataFrame, list[FeatureSpec], bool]:
    """The users and items tables (every id: the side table's plus those only in interactions),
    the feature specs, and whether item ids are integers."""
    import pyarrow.compute as pc

    user_feats, user_specs = pd.DataFrame(), list[FeatureSpec]()
    side_users: np.ndarray = np.empty(0, dtype=object)
    if src.users_path is not None:
        udf, uids, usrc = _read_side_table(src.users_path, "user_id")
        _check_unique(uids, udf, "user_id", usrc)
        user_feats, user_specs = infer_feature_columns(udf.drop(columns=["user_id", _WHERE]), path=src.users_path)
        side_users = uids.to_numpy(dtype=object)
        user_feats.index = pd.Index(side_users, dtype=object, name="user_id")
        # every interaction's user must have a row; checked in Arrow (a hash set of the side table's
        # ids), never as millions of Python strings in a pandas hash table (1.7 GB at 5M users)
        missing = pc.invert(pc.is_in(user_ids, value_set=pa.array(side_users, type=pa.string())))
        if pc.any(missing).as_py():
            first = user_ids.filter(missing)[0].as_py()
            raise DataError(f"user_id {first!r} is not in {src.users_path.name}", path=src.files[0].parent)
        # so the side table's ids are all the ids
        all_users = _sorted_user_index(side_users)
        users = user_feats.reindex(all_users)
    else:
        users = pd.DataFrame(index=_sorted_user_index(user_ids.to_numpy(zero_copy_only=False)))

    item_feats, item_specs = pd.DataFrame(), list[FeatureSpec]()
    side_items = pd.Series([], dtype=object)
    if src.items_path is not None:
        idf, side_items, isrc = _read_side_table(src.items_path, "item_id")
        _check_unique(side_items, idf, "item_id", isrc)
        item_feats, item_specs = infer_feature_columns(idf.drop(columns=["item_id", _WHERE]), path=src.items_path)
        as_int = as_int and bool(side_items.astype(str).str.fullmatch(r"-?\d{1,18}").all())
        side_ids = _as_item_ids(side_items, as_int)
        if as_int:
            _check_unique(side_ids, idf, "item_id", isrc)
        item_feats.index = pd.Index(side_ids.to_numpy(), name="item_id")
    inter_items = _as_item_ids(pd.Series(item_texts.to_pylist(), dtype=object), as_int)
    values = pd.unique(pd.concat([pd.Series(item_feats.index.to_numpy()), inter_items], ignore_index=True))
    item_index = pd.Index(np.sort(values.astype(np.int64)) if as_int else sorted(values),
                          dtype=np.int64 if as_int else object, name="item_id")
    if src.items_path is not None:
        unknown = ~inter_items.isin(item_feats.index).to_numpy()
        if unknown.any():
            raise DataError(f"item_id {inter_items[unknown].iloc[0]!r} is not in {src.items_path.name} "
                            f"({int(unknown.sum())} interaction item id(s) are not)", path=src.files[0].parent)
    items = item_feats.reindex(item_index) if src.items_path is not None else pd.DataFrame(index=item_index)
    return users, user_specs, items, item_specs, as_int


# ------------------------------------------------------------------------------------------------
# one shard


@dataclass
class ShardData:
    split: Split                 # this shard's users: train / valid / test rows (log order per user)
    examples: Examples           # from the train rows, (user, time) order


def stream_stats(part: Partitioned, n_items: int) -> Any:
    """training.defaults.DataStats of partitioned data: every user's train rows (the leave-last-out
    split holds out 2 rows of users with 3+), from the shards' user_id column alone."""
    import pyarrow.compute as pc

    from training.defaults import DataStats

    counts = [np.zeros(0, dtype=np.int64)]
    for s in range(part.shards):
        d = part.shard_dir(s)
        if d.is_dir():  # a shard holds every row of its users: its counts are theirs in full
            counts.append(pc.value_counts(pq.read_table(d, columns=["user_id"]).column(0))
                          .field("counts").to_numpy(zero_copy_only=False).astype(np.int64))
    per_user = np.concatenate(counts)  # memory: one count per user, never one Python object per id
    train = np.where(per_user >= 3, per_user - 2, per_user)
    return DataStats.from_counts(train, n_items=n_items, n_interactions=int(per_user.sum()))


def read_shard_interactions(part: Partitioned, s: int) -> pd.DataFrame:
    """Shard ``s``'s interactions in log order, exact duplicate (user, item, timestamp) rows dropped."""
    d = part.shard_dir(s)
    cols = {"user_id": pd.Series([], dtype=object), "item_id": pd.Series([], dtype=np.int64 if part.item_id_is_int
                                                                          else object),
            "timestamp": pd.Series([], dtype=np.int64), "weight": pd.Series([], dtype=np.float64)}
    if not d.is_dir():  # no user hashed here
        return pd.DataFrame(cols)
    df = pq.read_table(d, columns=SHARD_COLUMNS).to_pandas().sort_values("seq", kind="stable")
    inter = pd.DataFrame({
        "user_id": df["user_id"].to_numpy(dtype=object),
        "item_id": _as_item_ids(pd.Series(df["item_text"].to_numpy(dtype=object)), part.item_id_is_int).to_numpy(),
        "timestamp": df["timestamp"].to_numpy(np.int64),
        "weight": df["weight"].to_numpy(np.float64),
    })
    dup = inter.duplicated(subset=["user_id", "item_id", "timestamp"], keep="first").to_numpy()
    return inter.loc[~dup].reset_index(drop=True) if dup.any() else inter


def _rows(values: pd.Series, lookup: Any) -> np.ndarray:
    """Encoder rows of ``values``, each distinct value looked up once."""
    codes, uniques = pd.factorize(values)
    return np.asarray(lookup(list(uniques)), dtype=np.int64)[codes] if len(values) else np.zeros(0, np.int64)


class ShardReader:
    """Turns shard files into splits and examples with the encoder's row numbers."""

    def __init__(self, part: Partitioned, encoder: Any, history_len: int) -> None:
        # the encoder's own id -> row maps: at 5M users another index over the ids would cost ~0.2 GB
        self.part, self.encoder, self.history_len = part, encoder, history_len
        self._kept: tuple[int, Any] | None = None

    def keep(self, s: int, examples: Any) -> None:
        """Hold shard ``s``'s examples for ``examples(s)``: a rank with ONE shard keeps the examples
        its preparation pass built instead of reading and building them again every epoch (~0.9 s
        of a 6 s epoch at 100k users). Memory stays one shard, the bound of the streamed path."""
        self._kept = (s, examples)

    def examples(self, s: int) -> Any:
        """Shard ``s``'s training examples (the kept ones if ``keep`` holds that shard)."""
        if self._kept is not None and self._kept[0] == s:
            return self._kept[1]
        return self.read(s).examples

    def read(self, s: int) -> ShardData:
        inter = read_shard_interactions(self.part, s)
        split = split_leave_last_out(inter)
        train = split.train
        u = _rows(train["user_id"], self.encoder.user_rows)
        it = _rows(train["item_id"], self.encoder.item_rows)
        ex = examples_from_rows(u, it, train["timestamp"].to_numpy(np.int64), train["weight"].to_numpy(np.float64),
                                self.history_len)
        del inter, train
        release_freed_memory(collect=False)  # the shard's text columns and frames, gone before training on it
        return ShardData(split, ex)


class ShardBatches(EpochBatches):
    """The shards of one rank (``s % world == rank``), each lap in a new order, each shard's
    examples shuffled, cut into batches (the rest carried over to the next shard)."""

    def __init__(self, reader: ShardReader, shards: list[int], **kw: Any) -> None:
        super().__init__(**kw)
        self.reader, self.shards = reader, list(shards)

    def laps(self, lap: int) -> Any:
        w, n = self.worker_share()
        order = lap_order(len(self.shards), self.seed, self.epoch, self.rank, lap)[w::n]
        for k in order:
            s = self.shards[int(k)]
            ex = self.reader.examples(s)
            if len(ex):
                yield take(ex, lap_order(len(ex), self.seed, self.epoch, self.rank * 7919 + s, lap))


def shard_count(rows: int, shard_rows: int, world: int) -> int:
    """Shards of about ``shard_rows`` rows, a multiple of the number of ranks (each gets the same count)."""
    per_rank = max(1, math.ceil(max(rows, 1) / max(shard_rows, 1) / world))
    return per_rank * world


def eval_sample(users: np.ndarray, share: float) -> np.ndarray:
    """Which of ``users`` (ids) are in the evaluation sample (about ``share`` of them): a hash
    threshold, so the choice depends on the id only, not on the shard or the process."""
    cut = np.uint64(int(min(1.0, share) * int(_HASH_MOD)))
    return (user_hash(users) % _HASH_MOD) < cut


def sample_recdata(name: str, splits: list[Split], users: pd.DataFrame, items: pd.DataFrame,
                   user_specs: list[FeatureSpec], item_specs: list[FeatureSpec]) -> tuple[RecData, Split]:
    """The evaluation sample as the evaluator takes it: a RecData of the sampled users over the FULL
    catalogue, and their split."""
    empty = pd.DataFrame({"user_id": pd.Series([], dtype=object), "item_id": pd.Series([], dtype=items.index.dtype),
                          "timestamp": pd.Series([], dtype=np.int64), "weight": pd.Series([], dtype=np.float64)})
    cat = [pd.concat([empty] + [getattr(s, part) for s in splits], ignore_index=True)
           for part in ("train", "valid", "test")]  # no sample at all on the ranks that do not evaluate
    split = Split(*cat)
    uids = pd.unique(pd.concat([cat[0]["user_id"], cat[1]["user_id"], cat[2]["user_id"]]))
    sample_users = users.loc[users.index.isin(uids)]
    inter = pd.concat(cat, ignore_index=True)
    return RecData(name=name, interactions=inter, users=sample_users, items=items, user_features=user_specs,
                   item_features=item_specs), split


def write_tables(users: pd.DataFrame, items: pd.DataFrame, dest: Path) -> None:
    """``users.parquet`` and ``items.parquet`` of a data snapshot (multi-valued features as lists)."""
    dest.mkdir(parents=True, exist_ok=True)
    items = items.copy()
    items.index.name = "item_id"
    users = users.copy()
    users.index = pd.Index(np.asarray(users.index, dtype=object).astype(str), dtype=object, name="user_id")
    for table in (items, users):
        for col in table.columns:
            if table[col].dtype == object and table[col].map(lambda v: isinstance(v, tuple)).any():
                table[col] = table[col].map(list)  # Parquet list column; read back as a multi feature
    for table, name in ((items, "items.parquet"), (users, "users.parquet")):
        with atomic_open(dest / name, "wb") as f:
            table.to_parquet(f)


def write_stream_snapshot(part: Partitioned, users: pd.DataFrame, items: pd.DataFrame, dest: Path) -> None:
    """The data snapshot of a streamed run (what the evaluator and the reindex job read): the tables,
    and every interaction written shard by shard into one Parquet file (memory: one shard)."""
    write_tables(users, items, dest)
    schema = pa.schema([("user_id", pa.string()),
                        ("item_id", pa.int64() if part.item_id_is_int else pa.string()),
                        ("timestamp", pa.int64()), ("weight", pa.float64())])
    with atomic_open(dest / "interactions.parquet", "wb") as f, pq.ParquetWriter(f, schema) as writer:
        for s in range(part.shards):
            inter = read_shard_interactions(part, s)
            if len(inter):
                writer.write_table(pa.Table.from_pandas(inter, schema=schema, preserve_index=False))
