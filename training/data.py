"""Data loading for the training job: synthetic, MovieLens (100k / 1M / latest CSVs) and CSV/Parquet.

CONTRACT (other modules rely on exactly this):

    load_data(spec: str, **size_options) -> RecData
        spec is "synthetic", "movielens:DIR" or "csv:DIR".
    split_leave_last_out(data: RecData) -> Split

RecData.interactions: DataFrame with columns
    user_id (str), item_id (catalogue type: int64 or str), timestamp (int64), weight (float64)
RecData.users: DataFrame indexed by user_id (str) with feature columns typed per towers.schema
RecData.items: DataFrame indexed by item_id, one row for EVERY item of the catalogue (also items with
    no interactions), feature columns typed per towers.schema

Every loader validates before it builds anything: a bad file stops with a ``DataError`` naming the
file, the line (or Parquet row) and the column. Rows that are dropped on purpose (exact duplicates,
non-positive weights) are counted in ``RecData.dropped`` and logged as warnings.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from towers.schema import (
    DataError,
    FeatureSpec,
    drop_blank_rows,
    infer_feature_columns,
    is_parquet,
    read_table_with_lines,
)

log = logging.getLogger(__name__)


@dataclass
class RecData:
    name: str
    interactions: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    user_features: list[FeatureSpec]
    item_features: list[FeatureSpec]
    # synthetic data only: {"user_cluster": {user_id: primary cluster},
    #                       "user_clusters": {user_id: [clusters]}, "item_cluster": {item_id: cluster}}
    truth: dict[str, dict[Any, Any]] | None = None
    # reason -> number of rows dropped while loading (each reason is also logged)
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass
class Split:
    """Per-user temporal leave-last-out. valid/test hold one row per eligible user."""

    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame


INTERACTION_COLUMNS = ["user_id", "item_id", "timestamp", "weight"]

# Presets for --data synthetic; explicit counts override single fields of the preset.
SYNTHETIC_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"n_users": 200, "n_items": 120, "n_clusters": 4, "interactions_per_user": 20},
    "small": {"n_users": 2000, "n_items": 1000, "n_clusters": 8, "interactions_per_user": 30},
    "medium": {"n_users": 20_000, "n_items": 5000, "n_clusters": 16, "interactions_per_user": 40},
    "large": {"n_users": 100_000, "n_items": 20_000, "n_clusters": 32, "interactions_per_user": 50},
}


# --------------------------------------------------------------------------------------------------
# entry point

def load_data(spec: str, *, seed: int = 0, size: str | None = None, n_users: int | None = None,
              n_items: int | None = None, n_clusters: int | None = None,
              interactions_per_user: int | None = None, noise: float = 0.05,
              zipf_a: float = 1.0) -> RecData:
    """Load ``"synthetic"``, ``"movielens:DIR"`` or ``"csv:DIR"``.

    The size options only shape the synthetic generator (``size`` picks a preset from
    ``SYNTHETIC_SIZES``, default "small"; explicit counts override it). They are ignored, with a
    warning, for data read from files.
    """
    spec = spec.strip()
    kind, _, arg = spec.partition(":")
    kind = kind.lower()
    if kind == "synthetic":
        if arg:
            raise DataError(f"data spec {spec!r}: 'synthetic' takes no argument (use the size options)")
        preset = size or "small"
        if preset not in SYNTHETIC_SIZES:
            raise DataError(f"unknown synthetic size {preset!r} (choose from {', '.join(SYNTHETIC_SIZES)})")
        opts = dict(SYNTHETIC_SIZES[preset])
        for key, val in (("n_users", n_users), ("n_items", n_items), ("n_clusters", n_clusters),
                         ("interactions_per_user", interactions_per_user)):
            if val is not None:
                opts[key] = int(val)
        from training.synthetic import make_synthetic

        return make_synthetic(seed=seed, noise=noise, zipf_a=zipf_a, **opts)

    given = [k for k, v in (("size", size), ("n_users", n_users), ("n_items", n_items),
                            ("n_clusters", n_clusters), ("interactions_per_user", interactions_per_user))
             if v is not None]
    if given:
        log.warning("data %s: synthetic size options %s are ignored for data read from files", spec, given)
    if kind in ("movielens", "csv"):
        if not arg:
            raise DataError(f"data spec {spec!r} needs a directory: '{kind}:DIR'")
        directory = Path(arg).expanduser()
        if not directory.is_dir():
            raise DataError("data directory not found", path=directory)
        return load_movielens(directory) if kind == "movielens" else load_csv_dir(directory)
    raise DataError(f"unknown data spec {spec!r} (expected 'synthetic', 'movielens:DIR' or 'csv:DIR')")


# --------------------------------------------------------------------------------------------------
# shared validation helpers. Each frame carries a "_where" column: the 1-based file line (text
# files) or row (Parquet) of every row, so errors and drop logs can point at it.

_WHERE = "_where"
_INT_TEXT = re.compile(r"-?\d{1,18}")


@dataclass(frozen=True)
class _Source:
    path: Path
    by_row: bool = False  # Parquet: no lines, report 1-based rows

    def error(self, message: str, where: Any = None, column: str | None = None) -> DataError:
        loc = None if where is None else int(where)
        if self.by_row:
            return DataError(message, path=self.path, row=loc, column=column)
        return DataError(message, path=self.path, line=loc, column=column)


def _py(value: Any) -> Any:
    """Numpy scalars as plain Python values, so messages read 77 rather than np.int64(77)."""
    return value.item() if isinstance(value, np.generic) else value


def _first(mask: pd.Series | np.ndarray) -> int:
    return int(np.flatnonzero(np.asarray(mask))[0])


def _require_columns(df: pd.DataFrame, columns: list[str], src: _Source) -> None:
    for col in columns:
        if col not in df.columns:
            found = ", ".join(c for c in df.columns if c != _WHERE)
            raise DataError(f"missing required column {col!r} (found: {found})", path=src.path, column=col)


def _missing_error(df: pd.DataFrame, col: str, mask: np.ndarray, src: _Source) -> DataError:
    i = _first(mask)
    return src.error("missing value", df[_WHERE].iloc[i], col)


def _id_text(df: pd.DataFrame, col: str, src: _Source) -> pd.Series:
    """Ids as stripped strings (object dtype); integers and integral floats (Parquet) print as ints."""
    s = df[col]
    missing = s.isna().to_numpy()
    if missing.any():
        raise _missing_error(df, col, missing, src)
    if pd.api.types.is_bool_dtype(s):
        raise src.error("ids cannot be booleans", df[_WHERE].iloc[0], col)
    if pd.api.types.is_integer_dtype(s):
        return s.astype(np.int64).astype(str).astype(object)
    if pd.api.types.is_float_dtype(s):
        v = s.to_numpy(dtype=np.float64)
        bad = ~np.isfinite(v) | (v != np.floor(v))
        if bad.any():
            i = _first(bad)
            raise src.error(f"id {_py(s.iloc[i])!r} is not an integer or a string", df[_WHERE].iloc[i], col)
        return pd.Series(v.astype(np.int64), index=s.index).astype(str).astype(object)
    text = s.astype(str).str.strip()
    empty = (text == "").to_numpy()
    if empty.any():
        raise _missing_error(df, col, empty, src)
    return text.astype(object)


def _int_column(df: pd.DataFrame, col: str, src: _Source) -> np.ndarray:
    s = df[col]
    num = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(num) | (num != np.floor(num))
    if bad.any():
        i = _first(bad)
        v = _py(s.iloc[i])
        msg = "missing value" if pd.isna(v) or str(v).strip() == "" else f"{v!r} is not an integer"
        raise src.error(msg, df[_WHERE].iloc[i], col)
    return num.astype(np.int64)


def _timestamps(df: pd.DataFrame, col: str, src: _Source) -> np.ndarray:
    """Epoch seconds (int64) from integers, floats or ISO-8601 strings (naive times are UTC)."""
    s = df[col]
    where = df[_WHERE]
    if isinstance(s.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_dtype(s):
        if s.isna().any():
            raise _missing_error(df, col, s.isna().to_numpy(), src)
        dt = s.dt.tz_convert("UTC") if isinstance(s.dtype, pd.DatetimeTZDtype) else s.dt.tz_localize("UTC")
        return ((dt - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)
    if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
        v = s.to_numpy(dtype=np.float64)
        bad = ~np.isfinite(v)
        if bad.any():
            i = _first(bad)
            raise src.error("missing value" if pd.isna(s.iloc[i]) else f"{_py(s.iloc[i])!r} is not a timestamp",
                            where.iloc[i], col)
        return np.floor(v).astype(np.int64)
    missing = s.isna().to_numpy()
    if missing.any():
        raise _missing_error(df, col, missing, src)
    text = s.astype("str").str.strip()
    as_int = _text_to_int64(text)  # fast path: all integer epochs
    if as_int is not None:
        return as_int
    num = pd.to_numeric(text, errors="coerce")
    out = np.zeros(len(s), dtype=np.int64)
    is_num = num.notna().to_numpy() & np.isfinite(num.to_numpy(dtype=np.float64, na_value=np.nan))
    out[is_num] = np.floor(num.to_numpy(dtype=np.float64, na_value=np.nan)[is_num]).astype(np.int64)
    if not is_num.all():
        rest = text[~is_num]
        dt = pd.to_datetime(rest, format="ISO8601", utc=True, errors="coerce")
        bad = dt.isna().to_numpy()
        if bad.any():
            i = int(np.flatnonzero(~is_num)[_first(bad)])
            raise src.error(f"{_py(s.iloc[i])!r} is neither an integer epoch timestamp nor an ISO-8601 date/time",
                            where.iloc[i], col)
        out[~is_num] = ((dt - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)
    return out


def _weights(df: pd.DataFrame, col: str, src: _Source) -> np.ndarray:
    s = df[col]
    num = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(num)
    if bad.any():
        i = _first(bad)
        v = _py(s.iloc[i])
        msg = "missing value" if pd.isna(v) or str(v).strip() == "" else f"{v!r} is not a finite number"
        raise src.error(msg, df[_WHERE].iloc[i], col)
    return num


def _drop(df: pd.DataFrame, mask: np.ndarray, reason: str, src: _Source, dropped: dict[str, int]) -> pd.DataFrame:
    """Remove the masked rows, count them under ``reason`` and say so in the log (never silently)."""
    n = int(mask.sum())
    if n == 0:
        return df
    dropped[reason] = dropped.get(reason, 0) + n
    unit = "row" if src.by_row else "line"
    examples = ", ".join(str(int(w)) for w in df[_WHERE].to_numpy()[mask][:5])
    log.warning("%s: dropped %d row(s): %s (e.g. %s %s)", src.path, n, reason, unit + "s", examples)
    return df.loc[~mask]


def _check_known(df: pd.DataFrame, col: str, known: pd.Index, src: _Source, side_path: Path) -> None:
    unknown = ~df[col].isin(known).to_numpy()
    if unknown.any():
        i = _first(unknown)
        raise src.error(f"{col} {_py(df[col].iloc[i])!r} is not in {side_path.name} ({int(unknown.sum())} "
                        f"row(s) reference unknown ids)", df[_WHERE].iloc[i], col)


def _check_unique(ids: pd.Series, df: pd.DataFrame, col: str, src: _Source) -> None:
    dup = ids.duplicated(keep="first").to_numpy()
    if dup.any():
        i = _first(dup)
        j = _first((ids == ids.iloc[i]).to_numpy())
        unit = "row" if src.by_row else "line"
        raise src.error(f"duplicate {col} {_py(ids.iloc[i])!r} (first on {unit} {int(df[_WHERE].iloc[j])})",
                        df[_WHERE].iloc[i], col)


def _text_to_int64(text: pd.Series) -> np.ndarray | None:
    """Every value parsed as int64 by one Arrow cast (~15x faster than pandas), or None if any is not."""
    try:
        return np.asarray(pc.cast(pa.array(text.astype("str")), pa.int64()).to_numpy(zero_copy_only=False))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return None


def _as_item_ids(text: pd.Series, as_int: bool) -> pd.Series:
    if not as_int:
        return text.astype(object)
    ints = _text_to_int64(text)
    return pd.Series(ints if ints is not None else text.astype(np.int64), index=text.index, dtype=np.int64)


def _all_int_text(*texts: pd.Series) -> bool:
    """True when every id is a decimal integer that fits int64 (the catalogue then uses int64 ids).

    At most 18 digits always fits int64; longer ids (rare, e.g. 20-digit order numbers) stay strings.
    """
    return all(t.astype("str").str.fullmatch(_INT_TEXT.pattern).all() for t in texts if len(t))


def _sorted_user_index(ids: np.ndarray | pd.Series) -> pd.Index:
    """Unique user ids in a stable, readable order: numerically when all are digits."""
    uniq = pd.unique(pd.Series(ids, dtype=object))
    s = pd.Series(uniq, dtype=object)
    if len(s) and s.str.fullmatch(r"\d{1,18}").all():
        s = s.iloc[np.argsort(s.astype(np.int64).to_numpy(), kind="stable")]
    else:
        s = s.sort_values(kind="stable")
    return pd.Index(s.to_numpy(dtype=object), dtype=object, name="user_id")


def _finish(name: str, inter: pd.DataFrame, users: pd.DataFrame, user_specs: list[FeatureSpec],
            items: pd.DataFrame, item_specs: list[FeatureSpec], dropped: dict[str, int]) -> RecData:
    inter = inter[INTERACTION_COLUMNS].reset_index(drop=True)
    inter["user_id"] = inter["user_id"].astype(object)
    if inter["item_id"].dtype != np.int64:
        inter["item_id"] = inter["item_id"].astype(object)
    inter["timestamp"] = inter["timestamp"].astype(np.int64)
    inter["weight"] = inter["weight"].astype(np.float64)
    if len(inter) == 0:
        raise DataError(f"{name}: no interactions left after dropping rows ({dropped})")
    log.info("loaded %s: %d users, %d items, %d interactions%s", name, len(users), len(items), len(inter),
             f" (dropped {dropped})" if dropped else "")
    return RecData(name=name, interactions=inter, users=users, items=items, user_features=user_specs,
                   item_features=item_specs, dropped=dropped)


def _clean_interactions(df: pd.DataFrame, src: _Source, dropped: dict[str, int]) -> pd.DataFrame:
    """Drop non-positive weights and exact duplicate (user, item, timestamp) rows, counted and logged."""
    df = _drop(df, (df["weight"] <= 0).to_numpy(), "weight <= 0", src, dropped)
    dup = df.duplicated(subset=["user_id", "item_id", "timestamp"], keep="first").to_numpy()
    return _drop(df, dup, "duplicate (user_id, item_id, timestamp)", src, dropped)


# --------------------------------------------------------------------------------------------------
# CSV / Parquet directory

def _find_table(directory: Path, stem: str, *, required: bool) -> Path | None:
    found = [p for p in (directory / f"{stem}.csv", directory / f"{stem}.parquet") if p.is_file()]
    if len(found) > 1:
        raise DataError(f"both {stem}.csv and {stem}.parquet exist; keep one", path=directory)
    if not found:
        if required:
            raise DataError(f"{stem}.csv (or {stem}.parquet) not found", path=directory)
        return None
    return found[0]


def _read(path: Path, text_columns: tuple[str, ...]) -> tuple[pd.DataFrame, _Source]:
    df, where = read_table_with_lines(path, text_columns=text_columns)
    if _WHERE in df.columns:
        raise DataError(f"column name {_WHERE!r} is reserved", path=path, column=_WHERE)
    df[_WHERE] = where
    return df, _Source(path, by_row=is_parquet(path))


def _read_side_table(path: Path, id_col: str) -> tuple[pd.DataFrame, pd.Series, _Source]:
    df, src = _read(path, (id_col,))
    first_col = df.columns[0]
    if first_col != id_col:
        raise src.error(f"the first column must be {id_col!r} (found {first_col!r})",
                        None if src.by_row else 1, str(first_col))
    return df, _id_text(df, id_col, src), src


def load_csv_dir(directory: str | Path) -> RecData:
    """``interactions.csv`` (user_id,item_id,timestamp[,weight]) plus optional ``users.csv``/``items.csv``.

    Each may be ``.parquet`` instead. Side-table columns after the id become features: numbers
    numeric, ``|``-joined strings multi-valued, other strings categorical.
    """
    directory = Path(directory)
    inter_path = _find_table(directory, "interactions", required=True)
    users_path = _find_table(directory, "users", required=False)
    items_path = _find_table(directory, "items", required=False)
    assert inter_path is not None
    dropped: dict[str, int] = {}

    raw, src = _read(inter_path, ("user_id", "item_id", "timestamp", "weight"))
    _require_columns(raw, ["user_id", "item_id", "timestamp"], src)
    extra = [c for c in raw.columns if c not in (*INTERACTION_COLUMNS, _WHERE)]
    if extra:
        log.info("%s: ignoring extra columns %s", inter_path, extra)
    inter = pd.DataFrame({
        "user_id": _id_text(raw, "user_id", src),
        "item_text": _id_text(raw, "item_id", src),
        "timestamp": _timestamps(raw, "timestamp", src),
        "weight": _weights(raw, "weight", src) if "weight" in raw.columns else 1.0,
        _WHERE: raw[_WHERE],
    })

    # side tables: validated before any interaction row is dropped, so errors name original lines
    user_feats = pd.DataFrame()
    user_specs: list[FeatureSpec] = []
    user_ids_side: pd.Index | None = None
    if users_path is not None:
        udf, uids, usrc = _read_side_table(users_path, "user_id")
        _check_unique(uids, udf, "user_id", usrc)
        user_feats, user_specs = infer_feature_columns(udf.drop(columns=["user_id", _WHERE]), path=users_path)
        user_feats.index = pd.Index(uids.to_numpy(dtype=object), dtype=object, name="user_id")
        user_ids_side = user_feats.index
        _check_known(inter, "user_id", user_ids_side, src, users_path)

    item_text_side = None
    if items_path is not None:
        idf, item_text_side, isrc = _read_side_table(items_path, "item_id")
        _check_unique(item_text_side, idf, "item_id", isrc)
        item_feats, item_specs = infer_feature_columns(idf.drop(columns=["item_id", _WHERE]), path=items_path)
    else:
        item_feats, item_specs = pd.DataFrame(), list[FeatureSpec]()

    as_int = _all_int_text(inter["item_text"], *([item_text_side] if item_text_side is not None else []))
    inter["item_id"] = _as_item_ids(inter["item_text"], as_int)
    if item_text_side is not None:
        assert items_path is not None
        side_ids = _as_item_ids(item_text_side, as_int)
        if as_int:
            # "07" and "7" are the same integer id: duplicates can appear only after conversion
            _check_unique(side_ids, idf, "item_id", isrc)
        item_feats.index = pd.Index(side_ids.to_numpy(), name="item_id")
        _check_known(inter, "item_id", item_feats.index, src, items_path)

    inter = _clean_interactions(inter, src, dropped)

    # every user / item: the side table's plus those only seen in interactions
    all_users = _sorted_user_index(np.concatenate([
        inter["user_id"].to_numpy(dtype=object),
        user_ids_side.to_numpy(dtype=object) if user_ids_side is not None else np.empty(0, dtype=object)]))
    users = user_feats.reindex(all_users) if users_path is not None else pd.DataFrame(index=all_users)
    item_values = pd.unique(pd.concat([pd.Series(item_feats.index.to_numpy()) if items_path is not None
                                       else pd.Series([], dtype=inter["item_id"].dtype),
                                       inter["item_id"]], ignore_index=True))
    item_index = pd.Index(np.sort(item_values) if as_int else sorted(item_values),
                          dtype=np.int64 if as_int else object, name="item_id")
    items = item_feats.reindex(item_index) if items_path is not None else pd.DataFrame(index=item_index)
    return _finish(f"csv:{directory.name}", inter, users, user_specs, items, item_specs, dropped)


# --------------------------------------------------------------------------------------------------
# MovieLens

# ML-1M publishes age as these buckets; ML-100k ages are bucketed the same way so "age" means the
# same categorical feature for both, and an embedding per bucket can learn tastes that do not grow
# linearly with age (teenagers vs. 50+), which a single standardised number cannot.
_AGE_BUCKETS_1M = {1: "Under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55", 56: "56+"}
_ML1M_OCCUPATIONS = [
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student", "customer service",
    "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer",
    "programmer", "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer",
    "tradesman/craftsman", "unemployed", "writer",
]
_ML_USER_SPECS = [FeatureSpec("gender", "categorical"), FeatureSpec("age", "categorical"),
                  FeatureSpec("occupation", "categorical"), FeatureSpec("zip_prefix", "categorical")]
_ML_ITEM_SPECS = [FeatureSpec("genres", "multi"), FeatureSpec("year", "numeric")]
_TITLE_YEAR = re.compile(r"\((\d{4})\)\s*$")
_UNIT_SEP = "\x1f"  # stands in for the two-character "::" so the fast C parser can split ML-1M lines
_ZIP_PREFIX_LEN = 2  # 3-digit zip prefixes are almost unique per user in ML-100k; 2 digits generalise


def load_movielens(directory: str | Path) -> RecData:
    """MovieLens-100k (``u.data`` ...), MovieLens-1M (``ratings.dat`` ...) or the "latest" CSV format
    of ml-latest(-small), ML-20M, ML-25M and ML-32M (``ratings.csv`` ...), detected by the files present.

    Every rating counts as an implicit-feedback interaction with weight 1.0 (the rating value is
    not kept: retrieval learns what people watch, not how they scored it).
    """
    directory = Path(directory)
    if (directory / "u.data").is_file():
        return _load_ml100k(directory)
    if (directory / "ratings.dat").is_file():
        return _load_ml1m(directory)
    if (directory / "ratings.csv").is_file():
        return _load_ml_latest(directory)
    raise DataError("no MovieLens files found (expected u.data for MovieLens-100k, ratings.dat for "
                    "MovieLens-1M or ratings.csv for MovieLens latest / 20M / 25M / 32M)", path=directory)


def _read_delimited(path: Path, sep: str, names: list[str], *, encoding: str,
                    numeric: dict[str, type] | None = None) -> tuple[pd.DataFrame, _Source]:
    """A header-less delimited text file as string columns, with the file line of every row.

    ``numeric`` columns are first parsed straight to numbers by the C parser (an order of magnitude
    faster than converting text); if anything in the file is off, it is re-read as text so the
    validators can name the bad line and column.
    """
    src = _Source(path)
    if not path.is_file():
        raise DataError("file not found", path=path)
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError("file is empty", path=path)
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise DataError(f"not {encoding} text ({exc.reason} at byte {exc.start})", path=path) from exc
    c_sep = sep
    if len(sep) > 1:
        text = text.replace(sep, _UNIT_SEP)
        c_sep = _UNIT_SEP
    opts: dict[str, Any] = dict(sep=c_sep, header=None, names=names, quoting=csv.QUOTE_NONE,
                                keep_default_na=False, na_values=[""], skip_blank_lines=False,
                                on_bad_lines="error", engine="c")
    if numeric:
        try:
            df = pd.read_csv(io.StringIO(text), dtype={c: numeric.get(c, str) for c in names}, **opts)
            if not df[list(numeric)].isna().any().any():
                df[_WHERE] = np.arange(1, len(df) + 1, dtype=np.int64)
                return df, src
        except (ValueError, pd.errors.ParserError):
            pass  # the text path below finds and reports the problem
    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, **opts)
    except pd.errors.ParserError as exc:
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
        if m:
            raise DataError(f"expected {len(names)} {sep!r}-separated fields, found {m.group(3)}",
                            path=path, line=int(m.group(2))) from exc
        raise DataError(f"unparsable file: {exc}", path=path) from exc
    df, where = drop_blank_rows(df, np.arange(1, len(df) + 1, dtype=np.int64))  # no header: row i is line i + 1
    if df.empty:
        raise DataError("file has no rows", path=path)
    df[_WHERE] = where
    return df, src


def _ratings(path: Path, sep: str, encoding: str, dropped: dict[str, int]) -> tuple[pd.DataFrame, _Source]:
    df, src = _read_delimited(path, sep, ["user_id", "item_id", "rating", "timestamp"], encoding=encoding,
                              numeric={"user_id": np.int64, "item_id": np.int64, "rating": np.float64,
                                       "timestamp": np.int64})
    # user ids become strings once per distinct user, not once per row
    uniq, inverse = np.unique(_int_column(df, "user_id", src), return_inverse=True)
    inter = pd.DataFrame({
        "user_id": np.array([str(u) for u in uniq], dtype=object)[inverse],
        "item_id": _int_column(df, "item_id", src),
        "timestamp": _int_column(df, "timestamp", src),
        "weight": 1.0,
        _WHERE: df[_WHERE].to_numpy(),
    })
    _weights(df, "rating", src)  # validates the rating field, which is otherwise unused
    return inter, src


def _users_table(df: pd.DataFrame, src: _Source, ages: pd.Series, occupations: pd.Series) -> pd.DataFrame:
    uids = pd.Series(_int_column(df, "user_id", src).astype(str), dtype=object)
    _check_unique(uids, df, "user_id", src)
    for col in ("gender", "zip"):
        miss = df[col].isna().to_numpy()
        if miss.any():
            raise _missing_error(df, col, miss, src)
    users = pd.DataFrame({
        "gender": df["gender"].str.strip().astype(object).to_numpy(),
        "age": ages.to_numpy(dtype=object),
        "occupation": occupations.to_numpy(dtype=object),
        "zip_prefix": df["zip"].str.strip().str[:_ZIP_PREFIX_LEN].astype(object).to_numpy(),
    }, index=pd.Index(uids.to_numpy(), dtype=object, name="user_id"))
    return users


def _bucket_age(age: np.ndarray) -> pd.Series:
    edges = np.array([18, 25, 35, 45, 50, 56])
    labels = np.array(list(_AGE_BUCKETS_1M.values()), dtype=object)
    return pd.Series(labels[np.searchsorted(edges, age, side="right")], dtype=object)


def _assemble_movielens(name: str, inter: pd.DataFrame, src: _Source, users: pd.DataFrame | None,
                        users_path: Path, items: pd.DataFrame | None, items_path: Path,
                        dropped: dict[str, int]) -> RecData:
    if users is not None:
        _check_known(inter, "user_id", users.index, src, users_path)
    else:
        log.warning("%s not found: MovieLens users get no features", users_path)
    if items is not None:
        _check_known(inter, "item_id", items.index, src, items_path)
    else:
        log.warning("%s not found: MovieLens items get no features", items_path)
    inter = _clean_interactions(inter, src, dropped)
    all_users = _sorted_user_index(inter["user_id"].to_numpy(dtype=object) if users is None
                                   else np.concatenate([users.index.to_numpy(dtype=object),
                                                        inter["user_id"].to_numpy(dtype=object)]))
    item_index = pd.Index(np.unique(np.concatenate([
        items.index.to_numpy(dtype=np.int64) if items is not None else np.empty(0, np.int64),
        inter["item_id"].to_numpy(dtype=np.int64)])), dtype=np.int64, name="item_id")
    users_out = users.reindex(all_users) if users is not None else pd.DataFrame(index=all_users)
    items_out = items.reindex(item_index) if items is not None else pd.DataFrame(index=item_index)
    return _finish(name, inter, users_out, _ML_USER_SPECS if users is not None else [],
                   items_out, _ML_ITEM_SPECS if items is not None else [], dropped)


def _load_ml100k(d: Path) -> RecData:
    dropped: dict[str, int] = {}
    inter, src = _ratings(d / "u.data", "\t", "latin-1", dropped)

    users = None
    if (d / "u.user").is_file():
        udf, usrc = _read_delimited(d / "u.user", "|", ["user_id", "age", "gender", "occupation", "zip"],
                                    encoding="latin-1")
        ages = _bucket_age(_int_column(udf, "age", usrc))
        occ = udf["occupation"].fillna("").str.strip()
        users = _users_table(udf, usrc, ages, occ)

    items = None
    if (d / "u.item").is_file():
        genres = _ml100k_genres(d / "u.genre")
        flag_cols = [f"g{k}" for k in range(len(genres))]
        idf, isrc = _read_delimited(d / "u.item", "|", ["item_id", "title", "release", "video", "url", *flag_cols],
                                    encoding="latin-1")
        ids = pd.Series(_int_column(idf, "item_id", isrc))
        _check_unique(ids, idf, "item_id", isrc)
        flags = np.stack([_int_column(idf, c, isrc) for c in flag_cols], axis=1)  # (N, G)
        names = np.array(genres, dtype=object)
        item_genres = [tuple(names[row.astype(bool)]) for row in flags]
        # year from the release date ("01-Jan-1995"); the title's "(1995)" when the date is missing
        year = pd.to_numeric(idf["release"].str.extract(r"(\d{4})\s*$")[0], errors="coerce")
        title_year = pd.to_numeric(idf["title"].str.extract(_TITLE_YEAR.pattern)[0], errors="coerce")
        year = year.fillna(title_year).astype(np.float64)
        items = pd.DataFrame({
            "genres": pd.Series(item_genres, dtype=object).to_numpy(),
            "year": year.to_numpy(),
            "title": idf["title"].fillna("").str.strip().astype(object).to_numpy(),
        }, index=pd.Index(ids.to_numpy(), dtype=np.int64, name="item_id"))
    return _assemble_movielens("movielens-100k", inter, src, users, d / "u.user", items, d / "u.item", dropped)


def _ml100k_genres(path: Path) -> list[str]:
    df, src = _read_delimited(path, "|", ["name", "index"], encoding="latin-1")
    idx = _int_column(df, "index", src)
    if sorted(idx.tolist()) != list(range(len(idx))):
        raise DataError(f"genre indices must be 0..{len(idx) - 1} (found {sorted(idx.tolist())})", path=path)
    names = df["name"].fillna("").str.strip().to_numpy(dtype=object)
    return [str(names[np.flatnonzero(idx == k)[0]]) for k in range(len(idx))]


def _load_ml1m(d: Path) -> RecData:
    dropped: dict[str, int] = {}
    inter, src = _ratings(d / "ratings.dat", "::", "latin-1", dropped)

    users = None
    if (d / "users.dat").is_file():
        udf, usrc = _read_delimited(d / "users.dat", "::", ["user_id", "gender", "age", "occupation", "zip"],
                                    encoding="latin-1")
        age_code = _int_column(udf, "age", usrc)
        bad = ~np.isin(age_code, list(_AGE_BUCKETS_1M))
        if bad.any():
            i = _first(bad)
            raise usrc.error(f"unknown age code {int(age_code[i])} (expected one of {sorted(_AGE_BUCKETS_1M)})",
                             udf[_WHERE].iloc[i], "age")
        occ_code = _int_column(udf, "occupation", usrc)
        bad = (occ_code < 0) | (occ_code >= len(_ML1M_OCCUPATIONS))
        if bad.any():
            i = _first(bad)
            raise usrc.error(f"unknown occupation code {int(occ_code[i])} (expected 0-{len(_ML1M_OCCUPATIONS) - 1})",
                             udf[_WHERE].iloc[i], "occupation")
        ages = pd.Series([_AGE_BUCKETS_1M[int(a)] for a in age_code], dtype=object)
        occ = pd.Series(np.array(_ML1M_OCCUPATIONS, dtype=object)[occ_code], dtype=object)
        users = _users_table(udf, usrc, ages, occ)

    items = None
    if (d / "movies.dat").is_file():
        idf, isrc = _read_delimited(d / "movies.dat", "::", ["item_id", "title", "genres"], encoding="latin-1")
        ids = pd.Series(_int_column(idf, "item_id", isrc))
        _check_unique(ids, idf, "item_id", isrc)
        title = idf["title"].fillna("").str.strip()
        year = pd.to_numeric(title.str.extract(_TITLE_YEAR.pattern)[0], errors="coerce").astype(np.float64)
        genre_lists = [tuple(g.strip() for g in str(v).split("|") if g.strip()) if isinstance(v, str) else ()
                       for v in idf["genres"].to_numpy(dtype=object)]
        items = pd.DataFrame({
            "genres": pd.Series(genre_lists, dtype=object).to_numpy(),
            "year": year.to_numpy(),
            "title": title.astype(object).to_numpy(),
        }, index=pd.Index(ids.to_numpy(), dtype=np.int64, name="item_id"))
    return _assemble_movielens("movielens-1m", inter, src, users, d / "users.dat", items, d / "movies.dat",
                               dropped)


# MovieLens "latest" CSVs (ml-latest, ml-latest-small, ML-20M, ML-25M, ML-32M): a header line, comma
# separated, titles quoted when they hold a comma. Read by pyarrow's multi-threaded CSV reader (25M
# ratings in a few seconds); a file it cannot parse cleanly is re-read by the line-numbered text
# reader so the error names the file, line and column.

_LATEST_RATINGS = {"userId": "int64", "movieId": "int64", "rating": "float64", "timestamp": "int64"}
_LATEST_MOVIES = {"movieId": "int64", "title": "string", "genres": "string"}
_LATEST_TAGS = {"userId": "int64", "movieId": "int64", "tag": "string", "timestamp": "int64"}
_NO_GENRES = "(no genres listed)"
# tags: the most-applied ones per movie, and only tags found on at least this many movies (a tag
# of one movie says nothing about any other and only grows the vocabulary)
TAGS_PER_ITEM = 10
TAG_MIN_ITEMS = 2


def _latest_csv(path: Path, columns: dict[str, str]) -> tuple[pd.DataFrame, _Source]:
    """The named columns of a MovieLens "latest" CSV, typed; other columns are ignored.

    Fast path: pyarrow with fixed column types. Anything off (a missing column, a non-number, a
    ragged line, an empty field) falls back to the text reader, whose validators name the line."""
    import pyarrow.csv as pacsv

    src = _Source(path)
    if not path.is_file():
        raise DataError("file not found", path=path)
    if path.stat().st_size == 0:
        raise DataError("file is empty", path=path)
    types = {c: pa.int64() if t == "int64" else pa.float64() if t == "float64" else pa.string()
             for c, t in columns.items()}
    try:
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types=types, include_columns=list(columns), strings_can_be_null=False))
        clean = table.num_rows > 0 and all(table.column(c).null_count == 0 for c in columns)
    except (pa.ArrowInvalid, pa.ArrowKeyError, pa.ArrowTypeError, KeyError):
        clean = False
    if clean:
        df = table.to_pandas()
        # no blank lines or multi-line fields were found, so row i sits on line i + 2 (header = 1)
        df[_WHERE] = np.arange(2, len(df) + 2, dtype=np.int64)
        return df, src
    df, src = _read(path, tuple(c for c, t in columns.items() if t == "string"))
    _require_columns(df, list(columns), src)
    for col, kind in columns.items():
        if kind == "int64":
            df[col] = _int_column(df, col, src)
        elif kind == "float64":
            df[col] = _weights(df, col, src)
        else:
            miss = df[col].isna().to_numpy()
            if miss.any() and col != "genres":
                raise _missing_error(df, col, miss, src)
            df[col] = df[col].fillna("").astype(str)
    if not len(df):
        raise DataError("file has a header but no rows", path=path)
    return df, src


def _load_ml_latest(d: Path) -> RecData:
    dropped: dict[str, int] = {}
    df, src = _latest_csv(d / "ratings.csv", _LATEST_RATINGS)
    # integer columns while rows are checked and dropped; user ids become strings once, at the end
    inter = pd.DataFrame({
        "user_id": df["userId"].to_numpy(dtype=np.int64),
        "item_id": df["movieId"].to_numpy(dtype=np.int64),
        "timestamp": df["timestamp"].to_numpy(dtype=np.int64),
        "weight": 1.0,  # implicit feedback: every rating is a watch (as for 100k / 1M)
        _WHERE: df[_WHERE].to_numpy(),
    })
    del df

    items = None
    movies_path = d / "movies.csv"
    if movies_path.is_file():
        mdf, msrc = _latest_csv(movies_path, _LATEST_MOVIES)
        ids = pd.Series(mdf["movieId"].to_numpy(dtype=np.int64))
        _check_unique(ids, mdf, "movieId", msrc)
        title = mdf["title"].str.strip()
        year = pd.to_numeric(title.str.extract(_TITLE_YEAR.pattern)[0], errors="coerce").astype(np.float64)
        genre_lists = [() if g.strip() == _NO_GENRES else tuple(p.strip() for p in g.split("|") if p.strip())
                       for g in mdf["genres"].to_numpy(dtype=object)]
        index = pd.Index(ids.to_numpy(), dtype=np.int64, name="item_id")
        items = pd.DataFrame({"genres": pd.Series(genre_lists, dtype=object).to_numpy(), "year": year.to_numpy(),
                              "title": title.astype(object).to_numpy()}, index=index)
        tags_path = d / "tags.csv"
        if tags_path.is_file():
            items["tags"] = _latest_tags(tags_path, index, movies_path)
    elif (d / "tags.csv").is_file():
        log.warning("%s: ignored without movies.csv (tags are a feature of the catalogue's items)",
                    d / "tags.csv")
    if items is not None:
        # A rating of a movie that movies.csv does not list cannot be a real MovieLens row (every
        # release lists each rated movie). Unlike the 100k/1M side files, movies.csv is optional
        # metadata next to a ratings file that can be tens of millions of lines, so such rows are
        # dropped, counted and logged with their lines rather than stopping the job.
        unknown = ~inter["item_id"].isin(items.index).to_numpy()
        inter = _drop(inter, unknown, "movieId not in movies.csv", src, dropped)
    else:
        log.warning("%s not found: MovieLens items get no features", movies_path)
    inter = _clean_interactions(inter, src, dropped)
    uniq, inverse = np.unique(inter["user_id"].to_numpy(dtype=np.int64), return_inverse=True)
    user_text = np.array([str(u) for u in uniq], dtype=object)
    inter["user_id"] = user_text[inverse]
    users = pd.DataFrame(index=pd.Index(user_text, dtype=object, name="user_id"))  # numeric order
    item_index = pd.Index(np.unique(np.concatenate([
        items.index.to_numpy(dtype=np.int64) if items is not None else np.empty(0, np.int64),
        inter["item_id"].to_numpy(dtype=np.int64)])), dtype=np.int64, name="item_id")
    items_out = items.reindex(item_index) if items is not None else pd.DataFrame(index=item_index)
    specs = []
    if items is not None:
        specs = list(_ML_ITEM_SPECS) + ([FeatureSpec("tags", "multi")] if "tags" in items.columns else [])
    name = "movielens-latest-small" if d.name.startswith("ml-latest-small") else f"movielens-{d.name}"
    return _finish(name, inter, users, [], items_out, specs, dropped)


def _latest_tags(path: Path, movies: pd.Index, movies_path: Path) -> np.ndarray:
    """Per movie, the tuple of its ``TAGS_PER_ITEM`` most-applied tags (lower-cased), most applied first."""
    tdf, tsrc = _latest_csv(path, _LATEST_TAGS)
    unknown = ~tdf["movieId"].isin(movies).to_numpy()
    if unknown.any():
        i = _first(unknown)
        raise tsrc.error(f"movieId {_py(tdf['movieId'].iloc[i])!r} is not in {movies_path.name}",
                         tdf[_WHERE].iloc[i], "movieId")
    tag = tdf["tag"].str.strip().str.lower()
    pairs = pd.DataFrame({"item": tdf["movieId"].to_numpy(dtype=np.int64), "tag": tag.to_numpy(dtype=object)})
    pairs = pairs[pairs["tag"] != ""]
    counts = pairs.groupby(["item", "tag"], sort=False).size().rename("n").reset_index()
    spread = counts.groupby("tag")["item"].transform("size")
    counts = counts[spread >= TAG_MIN_ITEMS]
    counts = counts.sort_values(["item", "n", "tag"], ascending=[True, False, True], kind="stable")
    top = counts.groupby("item", sort=False).head(TAGS_PER_ITEM)
    per_item = top.groupby("item", sort=False)["tag"].agg(tuple)
    out = np.empty(len(movies), dtype=object)
    out[:] = [()] * len(movies)
    pos = movies.get_indexer(per_item.index)
    for p, t in zip(pos, per_item.to_numpy(), strict=True):
        out[p] = t
    return out


# --------------------------------------------------------------------------------------------------
# split

def split_leave_last_out(data: RecData | pd.DataFrame) -> Split:
    """Per user, by (timestamp, original row order): last -> test, the one before -> valid, rest -> train.

    Users with fewer than 3 interactions go entirely to train (one held-out row would leave them
    no history to learn from). Vectorised: no Python loop over users.
    """
    df = data.interactions if isinstance(data, RecData) else data
    n = len(df)
    codes, _ = pd.factorize(df["user_id"], sort=False)
    order = np.lexsort((np.arange(n), df["timestamp"].to_numpy(dtype=np.int64), codes))
    sorted_codes = codes[order]
    sizes = np.bincount(codes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    pos = np.arange(n) - starts[sorted_codes]  # 0-based position inside the user's timeline
    from_end = sizes[sorted_codes] - 1 - pos
    eligible = sizes[sorted_codes] >= 3
    is_test = eligible & (from_end == 0)
    is_valid = eligible & (from_end == 1)
    ordered = df.iloc[order].reset_index(drop=True)
    return Split(
        train=ordered.loc[~(is_test | is_valid)].reset_index(drop=True),
        valid=ordered.loc[is_valid].reset_index(drop=True),
        test=ordered.loc[is_test].reset_index(drop=True),
    )
