"""Feature schema and side-table parsing shared by the training and reindex jobs.

A side table (users or items) is a pandas DataFrame indexed by id whose columns are features:
- ``categorical``: one string per row (missing -> "")
- ``multi``: a tuple of strings per row (genres, tags); empty tuple when missing
- ``numeric``: float per row (missing -> NaN, imputed with the training mean by the encoder)

User ids are always strings (the wire accepts "7" and 7 as the same user). Item ids keep the
catalogue's type: int64 when every id parses as an integer, str otherwise.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:  # pandas is imported where a table is read: serving never needs it
    import pandas as pd

log = logging.getLogger(__name__)

FeatureKind = Literal["categorical", "multi", "numeric"]
MULTI_SEP = "|"
_INT_RE = re.compile(r"-?\d+")


class DataError(ValueError):
    """Bad input data. The message names the file, and line/column where known."""

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None,
                 column: str | None = None, row: int | None = None) -> None:
        # ``line`` is a 1-based text line (CSV: the header is line 1); ``row`` is a 1-based row of a
        # file without lines (Parquet).
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        self.path, self.line, self.column, self.row = path, line, column, row
        super().__init__(f"{': '.join([', '.join(where), message]) if where else message}")


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    kind: FeatureKind

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> FeatureSpec:
        if d.get("kind") not in ("categorical", "multi", "numeric"):
            raise ValueError(f"unknown feature kind {d.get('kind')!r} for feature {d.get('name')!r}")
        return FeatureSpec(name=str(d["name"]), kind=d["kind"])


def normalize_user_id(uid: Any) -> str:
    """7, 7.0, "7" and " 7 " are the same user."""
    if isinstance(uid, bool):
        raise ValueError("a user id cannot be a boolean")
    if isinstance(uid, float):
        if not math.isfinite(uid) or uid != int(uid):
            raise ValueError(f"user id {uid!r} is not an integer or string")
        uid = int(uid)
    s = str(uid).strip()
    if not s:
        raise ValueError("user id is empty")
    return s


def item_ids_are_int(values: Iterable[Any]) -> bool:
    """True when every id is an integer or a string of digits (then the catalogue uses int64 ids)."""
    for v in values:
        if isinstance(v, bool):
            return False
        if isinstance(v, (int, np.integer)):
            continue
        if not _INT_RE.fullmatch(str(v).strip()):
            return False
    return True


def coerce_item_ids(values: pd.Series, as_int: bool) -> pd.Series:
    if as_int:
        return values.map(lambda v: int(str(v).strip())).astype("int64")
    return values.map(lambda v: str(v).strip()).astype(object)


def infer_feature_columns(df: pd.DataFrame, *, path: str | Path | None = None) -> tuple[pd.DataFrame, list[FeatureSpec]]:
    """Type every column of a side table: numbers numeric, ``|``-joined strings multi, strings categorical."""
    import pandas as pd
    specs: list[FeatureSpec] = []
    out = pd.DataFrame(index=df.index)
    for col in df.columns:
        s = df[col]
        name = str(col)
        if s.dtype == object and s.map(_is_listlike).any():
            # Parquet stores multi-valued features as lists (they come back as numpy arrays)
            out[name] = s.map(split_multi)
            specs.append(FeatureSpec(name, "multi"))
        elif pd.api.types.is_bool_dtype(s):
            out[name] = s.astype(str)
            specs.append(FeatureSpec(name, "categorical"))
        elif pd.api.types.is_numeric_dtype(s):
            out[name] = pd.to_numeric(s, errors="coerce").astype("float64")
            specs.append(FeatureSpec(name, "numeric"))
        else:
            text = s.map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
            if text.str.contains(MULTI_SEP, regex=False).any():
                out[name] = text.map(split_multi)
                specs.append(FeatureSpec(name, "multi"))
            else:
                out[name] = text.str.strip()
                specs.append(FeatureSpec(name, "categorical"))
    return out, specs


def split_multi(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple, np.ndarray)):
        # a list column read back from Parquet arrives as a numpy array
        return tuple(str(v).strip() for v in value if str(v).strip())
    if isinstance(value, float) and math.isnan(value):
        return ()
    return tuple(p.strip() for p in str(value).split(MULTI_SEP) if p.strip())


def _is_listlike(value: Any) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def conform_table(df: pd.DataFrame, specs: list[FeatureSpec], *, path: str | Path | None = None) -> pd.DataFrame:
    """Coerce a side table to the given specs (used when new items arrive for reindexing).

    A missing column is an error: silently zero-filling a feature would change every vector.
    """
    import pandas as pd
    out = pd.DataFrame(index=df.index)
    for spec in specs:
        if spec.name not in df.columns:
            raise DataError(f"missing feature column {spec.name!r} (expected columns: "
                            f"{', '.join(s.name for s in specs)})", path=path, column=spec.name)
        s = df[spec.name]
        if spec.kind == "numeric":
            num = pd.to_numeric(s, errors="coerce")
            bad = num.isna() & s.notna() & (s.astype(str).str.strip() != "")
            if bad.any():
                row = int(bad.to_numpy().nonzero()[0][0])
                raise DataError(f"value {s.iloc[row]!r} is not a number", path=path, line=row + 2,
                                column=spec.name)
            out[spec.name] = num.astype("float64")
        elif spec.kind == "multi":
            out[spec.name] = s.map(split_multi)
        else:
            out[spec.name] = s.map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v))
                                   else str(v).strip())
    return out


def read_table(path: str | Path, *, text_columns: Iterable[str] = ()) -> pd.DataFrame:
    """Read a CSV or Parquet file; CSV columns whose every value is a number become numeric.

    ``text_columns`` stay text in a CSV (ids such as "007" must not become 7). Blank CSV lines are
    skipped. A Parquet file written from a frame indexed by id (as the artifacts are) gets its index
    back as the first column.
    """
    return read_table_with_lines(path, text_columns=text_columns)[0]


def read_table_with_lines(path: str | Path, *, text_columns: Iterable[str] = ()) -> tuple[pd.DataFrame, np.ndarray]:
    """``read_table`` plus where each row came from, for error messages.

    Returns ``(df, where)``: for a CSV ``where[i]`` is the 1-based file line of row ``i`` (the header is
    line 1, blank lines are counted); for Parquet it is the 1-based row number.
    """
    import pandas as pd
    keep_text = set(text_columns)
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path=path)
    if path.stat().st_size == 0:
        raise DataError("file is empty", path=path)
    if is_parquet(path):
        try:
            df = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises many types
            raise DataError(f"cannot read parquet: {exc}", path=path) from exc
        # rows, not cells: a side table of ids alone (the index, no feature column) is not empty
        if len(df) == 0:
            raise DataError("file has no rows", path=path)
        has_named_index = any(n is not None for n in df.index.names)
        df = df.reset_index(drop=not has_named_index)
        df.columns = [str(c).strip() for c in df.columns]
        return df, np.arange(1, len(df) + 1, dtype=np.int64)
    try:
        # blank lines are kept as all-NaN rows so row positions map to file lines
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], skipinitialspace=True,
                         on_bad_lines="error", skip_blank_lines=False)
    except pd.errors.EmptyDataError as exc:
        raise DataError("file is empty", path=path) from exc
    except pd.errors.ParserError as exc:
        line = _parser_error_line(str(exc))
        raise DataError(f"unparsable CSV: {exc}", path=path, line=line) from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", path=path) from exc
    df.columns = [str(c).strip() for c in df.columns]
    df, lines = drop_blank_rows(df, np.arange(2, len(df) + 2, dtype=np.int64))  # header is line 1
    if df.empty:
        raise DataError("file has a header but no rows", path=path)
    # numeric-looking columns become numbers; the rest stay strings
    for col in df.columns:
        if col in keep_text:
            continue
        conv = pd.to_numeric(df[col], errors="coerce")
        if conv.notna().sum() == df[col].notna().sum() and df[col].notna().any():
            df[col] = conv
    return df, lines


def is_parquet(path: str | Path) -> bool:
    return Path(path).suffix.lower() in (".parquet", ".pq")


def drop_blank_rows(df: pd.DataFrame, lines: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """Drop all-empty rows, keeping each remaining row's file line (blank lines still count)."""
    blank = df.isna().all(axis=1).to_numpy()
    if blank.any():
        return df.loc[~blank].reset_index(drop=True), lines[~blank]
    return df, lines


def _parser_error_line(msg: str) -> int | None:
    m = re.search(r"line (\d+)", msg)
    return int(m.group(1)) if m else None
