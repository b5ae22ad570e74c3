"""Feature encoding: raw ids and side-table values -> integer rows and normalised numbers.

Row 0 of every table is reserved: it is padding for sequences and the out-of-vocabulary bucket for
ids and values never seen at fit time. The encoder is plain data (lists, dicts, floats) so it
travels inside the checkpoint and loads with ``torch.load(weights_only=True)``.

Encoding produces NumPy arrays (``*_arrays`` methods); the torch methods wrap them as tensors for
the towers. Neither torch nor pandas is imported here until a method needs it: the service encodes
users with NumPy alone.
"""

from __future__ import annotations

import math
import sys
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from towers.idindex import SEP, IdIndex
from towers.schema import FeatureSpec, normalize_user_id, split_multi

if TYPE_CHECKING:
    import pandas as pd
    import torch

PAD = 0  # padding / out-of-vocabulary row


@dataclass
class Vocab:
    """String -> row. Exact when the vocabulary is enumerable, hashed into buckets otherwise."""

    tokens: list[str]
    hash_buckets: int = 0  # > 0: rows are 1 + crc32(token) % hash_buckets, `tokens` is unused

    def __post_init__(self) -> None:
        self._index = {t: i + 1 for i, t in enumerate(self.tokens)} if not self.hash_buckets else {}

    @property
    def size(self) -> int:
        """Rows including the reserved row 0."""
        return 1 + (self.hash_buckets or len(self.tokens))

    def row(self, token: str) -> int:
        if self.hash_buckets:
            # crc32 is stable across processes, unlike hash(); collisions are the price of no vocabulary
            return 1 + zlib.crc32(token.encode("utf-8")) % self.hash_buckets
        return self._index.get(token, PAD)

    def rows(self, tokens: Iterable[str]) -> list[int]:
        return [self.row(t) for t in tokens]

    @staticmethod
    def build(values: Iterable[str], *, max_size: int = 200_000, hash_buckets: int = 50_000) -> Vocab:
        uniq = sorted({v for v in values if v != ""})
        if len(uniq) > max_size:
            return Vocab(tokens=[], hash_buckets=hash_buckets)
        return Vocab(tokens=uniq)

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": list(self.tokens), "hash_buckets": int(self.hash_buckets)}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Vocab:
        return Vocab(tokens=[str(t) for t in d["tokens"]], hash_buckets=int(d.get("hash_buckets", 0)))


_ID_SEP = SEP
_PACK_AT = 10_000


def _pack_ids(ids: list[str]) -> list[str] | dict[str, Any]:
    """Many string ids as ONE string joined by NUL (when no id contains one): a checkpoint with 5M
    user ids then pickles one object instead of 5M (pickle's memo of them alone took ~0.7 GB)."""
    if len(ids) >= _PACK_AT:
        text = _ID_SEP.join(ids)
        if text.count(_ID_SEP) == len(ids) - 1:
            return {"joined": text, "sep": _ID_SEP, "count": len(ids)}
    return list(ids)


def _unpack_user_ids(value: Any) -> IdIndex:
    if isinstance(value, dict):  # straight from the joined text: never one str object per user
        return IdIndex.joined(value["joined"], int(value["count"])) if value["sep"] == SEP else IdIndex.of(
            _unpack_ids(value))
    return IdIndex.of([str(u) for u in value])


def _unpack_ids(value: Any) -> list[Any]:
    if isinstance(value, dict):
        ids = value["joined"].split(value["sep"]) if value["count"] else []
        if len(ids) != value["count"]:
            raise ValueError(f"packed ids: {len(ids)} found, {value['count']} expected")
        return ids
    return list(value)


def _feature_key(side: str, spec: FeatureSpec) -> str:
    return f"{side}:{spec.kind}:{spec.name}"


class FeatureEncoder:
    """Maps users, items and their side features to tensors the towers consume.

    Batch dictionaries use these keys:
      user side: ``user_row`` (B,), ``hist`` (B, L) item rows, 0 = padding, and one key per user
      feature; item side: ``item_row`` (N,) and one key per item feature. Feature keys are
      ``"<side>:<kind>:<name>"``: categorical (B,) long, multi (B, M) long padded with 0,
      numeric (B,) float (standardised, missing -> 0 i.e. the training mean).
    """

    def __init__(self, *, user_features: list[FeatureSpec], item_features: list[FeatureSpec],
                 user_ids: Iterable[str] | IdIndex, item_ids: list[Any], item_id_is_int: bool,
                 vocabs: dict[str, Vocab], numeric_stats: dict[str, tuple[float, float]],
                 history_len: int = 50) -> None:
        self.user_features = list(user_features)
        self.item_features = list(item_features)
        # the users' rows: a compact index, not a dict (at 5M users a dict of str -> int is ~0.6 GB)
        self._users = user_ids if isinstance(user_ids, IdIndex) else IdIndex.of([str(u) for u in user_ids])
        self.item_ids = [int(i) for i in item_ids] if item_id_is_int else [str(i) for i in item_ids]
        self.item_id_is_int = item_id_is_int
        self.vocabs = vocabs
        self.numeric_stats = numeric_stats
        self.history_len = int(history_len)
        self._item_row = {i: r + 1 for r, i in enumerate(self.item_ids)}

    # ---------------------------------------------------------------- fitting and serialisation
    @classmethod
    def fit(cls, users: pd.DataFrame, items: pd.DataFrame, user_features: list[FeatureSpec],
            item_features: list[FeatureSpec], *, history_len: int = 50,
            max_vocab: int = 200_000, hash_buckets: int = 50_000) -> FeatureEncoder:
        """Fit vocabularies and numeric statistics on the training tables.

        ``users``/``items`` are indexed by id; every id in them gets its own row.
        """
        import pandas as pd

        from towers.schema import item_ids_are_int

        item_ids = list(items.index)
        is_int = item_ids_are_int(item_ids)
        vocabs: dict[str, Vocab] = {}
        stats: dict[str, tuple[float, float]] = {}
        for side, table, specs in (("user", users, user_features), ("item", items, item_features)):
            for spec in specs:
                key = _feature_key(side, spec)
                col = table[spec.name] if spec.name in table.columns else pd.Series([], dtype=object)
                if spec.kind == "numeric":
                    vals = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
                    vals = vals[np.isfinite(vals)]
                    mean = float(vals.mean()) if vals.size else 0.0
                    std = float(vals.std()) if vals.size else 1.0
                    stats[key] = (mean, std if std > 1e-12 else 1.0)
                elif spec.kind == "multi":
                    vocabs[key] = Vocab.build((t for v in col for t in split_multi(v)),
                                              max_size=max_vocab, hash_buckets=hash_buckets)
                else:
                    vocabs[key] = Vocab.build((_cat(v) for v in col), max_size=max_vocab,
                                              hash_buckets=hash_buckets)
        return cls(user_features=user_features, item_features=item_features,
                   user_ids=[normalize_user_id(u) for u in users.index], item_ids=item_ids,
                   item_id_is_int=is_int, vocabs=vocabs, numeric_stats=stats, history_len=history_len)

    def to_dict(self) -> dict[str, Any]:
        return {
            "user_features": [s.to_dict() for s in self.user_features],
            "item_features": [s.to_dict() for s in self.item_features],
            "user_ids": self._users.packed() or self._users.tolist(),
            "item_ids": self.item_ids if self.item_id_is_int else _pack_ids([str(i) for i in self.item_ids]),
            "item_id_is_int": self.item_id_is_int,
            "vocabs": {k: v.to_dict() for k, v in self.vocabs.items()},
            "numeric_stats": {k: [float(m), float(s)] for k, (m, s) in self.numeric_stats.items()},
            "history_len": self.history_len,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureEncoder:
        return cls(
            user_features=[FeatureSpec.from_dict(s) for s in d["user_features"]],
            item_features=[FeatureSpec.from_dict(s) for s in d["item_features"]],
            user_ids=_unpack_user_ids(d["user_ids"]), item_ids=_unpack_ids(d["item_ids"]),
            item_id_is_int=bool(d["item_id_is_int"]),
            vocabs={k: Vocab.from_dict(v) for k, v in d["vocabs"].items()},
            numeric_stats={k: (float(v[0]), float(v[1])) for k, v in d["numeric_stats"].items()},
            history_len=int(d["history_len"]),
        )

    # ---------------------------------------------------------------- sizes for the towers
    @property
    def user_ids(self) -> list[str]:
        """Every known user id in row order (row = position + 1); a new list on each call."""
        return self._users.tolist()

    @property
    def n_user_rows(self) -> int:
        return len(self._users) + 1

    @property
    def n_item_rows(self) -> int:
        return len(self.item_ids) + 1

    def meta(self) -> dict[str, Any]:
        """What a tower needs to size its tables: rows per id/feature table and feature keys."""
        return {
            "n_user_rows": self.n_user_rows,
            "n_item_rows": self.n_item_rows,
            "user": [(_feature_key("user", s), s.kind, self._size(_feature_key("user", s), s))
                     for s in self.user_features],
            "item": [(_feature_key("item", s), s.kind, self._size(_feature_key("item", s), s))
                     for s in self.item_features],
        }

    def _size(self, key: str, spec: FeatureSpec) -> int:
        return 1 if spec.kind == "numeric" else self.vocabs[key].size

    # ---------------------------------------------------------------- id lookups
    def normalize_item_id(self, item_id: Any) -> Any:
        """Request ids may arrive as "42" or 42; the catalogue decides which type is meant."""
        if self.item_id_is_int:
            if type(item_id) is int:  # the common case, first
                return item_id
            if isinstance(item_id, bool):
                raise ValueError(f"item id {item_id!r} is not an integer")
            if isinstance(item_id, float) and item_id.is_integer():
                return int(item_id)
            return int(str(item_id).strip())
        return str(item_id).strip()

    def item_row(self, item_id: Any) -> int:
        try:
            return self._item_row.get(self.normalize_item_id(item_id), PAD)
        except (ValueError, TypeError):
            return PAD

    def item_rows(self, item_ids: Iterable[Any]) -> np.ndarray:
        return np.fromiter((self.item_row(i) for i in item_ids), dtype=np.int64)

    def user_row(self, user_id: Any) -> int:
        if user_id is None:
            return PAD
        try:
            return self._users.row(normalize_user_id(user_id))
        except ValueError:
            return PAD

    def user_rows(self, user_ids: Iterable[Any]) -> np.ndarray:
        keys: list[Any] = []
        for u in user_ids:
            try:
                keys.append(None if u is None else normalize_user_id(u))
            except ValueError:
                keys.append(None)  # never an id: row 0
        return self._users.rows(keys)

    # ---------------------------------------------------------------- encoding
    def _encode_side(self, side: str, specs: list[FeatureSpec], rows: Sequence[Mapping[str, Any] | None],
                     out: dict[str, np.ndarray]) -> None:
        n = len(rows)
        for spec in specs:
            key = _feature_key(side, spec)
            values = [(r.get(spec.name) if r is not None else None) for r in rows]
            if spec.kind == "numeric":
                mean, std = self.numeric_stats[key]
                arr = np.array([_num(v) for v in values], dtype=np.float64)
                arr = np.where(np.isfinite(arr), (arr - mean) / std, 0.0)
                out[key] = np.clip(arr, -5.0, 5.0).astype(np.float32)
            elif spec.kind == "multi":
                vocab = self.vocabs[key]
                bags = [[r for r in vocab.rows(split_multi(v)) if r != PAD] for v in values]
                width = max([1] + [len(b) for b in bags])
                mat = np.zeros((n, width), dtype=np.int64)  # (N, M), 0 = padding, ignored by pooling
                for i, b in enumerate(bags):
                    mat[i, : len(b)] = b
                out[key] = mat
            else:
                vocab = self.vocabs[key]
                out[key] = np.array([vocab.row(_cat(v)) for v in values], dtype=np.int64)

    def encode_items(self, items: pd.DataFrame) -> dict[str, torch.Tensor]:
        """Encode catalogue rows (indexed by item id). Ids unknown to the encoder get row 0:
        the tower then embeds them from content features alone (cold-start items)."""
        out: dict[str, np.ndarray] = {"item_row": self.item_rows(items.index)}
        out.update({k: v[1:] for k, v in self._encode_table("item", self.item_features, items).items()})
        return _tensors(out)

    def encode_users(self, user_ids: Sequence[Any], features: pd.DataFrame | Sequence[Mapping[str, Any] | None] | None,
                     histories: Sequence[Sequence[Any]] | None) -> dict[str, torch.Tensor]:
        """``encode_users_arrays`` as tensors, for the tower modules."""
        return _tensors(self.encode_users_arrays(user_ids, features, histories))

    def encode_users_arrays(self, user_ids: Sequence[Any],
                            features: pd.DataFrame | Sequence[Mapping[str, Any] | None] | None,
                            histories: Sequence[Sequence[Any]] | None) -> dict[str, np.ndarray]:
        """Encode a batch of users.

        ``user_ids``: ids (None or unknown -> row 0); ``features``: a DataFrame aligned with
        ``user_ids`` or one dict per user (None -> all missing); ``histories``: catalogue item ids
        per user, oldest first; unknown ids are skipped and only the last ``history_len`` kept.
        """
        n = len(user_ids)
        out: dict[str, np.ndarray] = {"user_row": self.user_rows(user_ids)}
        if features is None:
            recs: Sequence[Mapping[str, Any] | None] = [None] * n
        elif _is_frame(features):
            recs = _records(features, self.user_features)  # type: ignore[arg-type]
        else:
            recs = features  # type: ignore[assignment]
        if len(recs) != n:
            raise ValueError(f"{len(recs)} feature rows for {n} users")
        self._encode_side("user", self.user_features, recs, out)
        hist_rows = [self.history_rows(h) for h in (histories if histories is not None else [[]] * n)]
        out["hist"] = pad_rows(hist_rows, self.history_len)
        return out

    def history_rows(self, history: Sequence[Any]) -> np.ndarray:
        get, row = self._item_row.get, self.item_row
        # ids already in the catalogue's type (the service's case) skip normalisation
        rows = [r for r in ((get(h, PAD) if type(h) is int and self.item_id_is_int else row(h)) for h in history)
                if r != PAD]
        return np.asarray(rows[-self.history_len:], dtype=np.int64)

    def encode_user_table(self, users: pd.DataFrame) -> dict[str, torch.Tensor]:
        """Side features of every known user in user-row order (row 0 = unknown user), for
        training loops that gather feature rows by index instead of re-encoding per batch."""
        rows = self.user_rows(users.index)
        if len(rows) != len(self._users) or not (rows == np.arange(1, len(rows) + 1)).all():
            # one table row per known user, in row order; users the table lacks get missing features
            at = np.full(len(self._users), -1, dtype=np.int64)
            known = rows > 0
            at[rows[known] - 1] = np.flatnonzero(known)
            users = users.reset_index(drop=True).reindex(at)
        out = self._encode_table("user", self.user_features, users)
        out["user_row"] = np.arange(self.n_user_rows, dtype=np.int64)
        return _tensors(out)

    def encode_item_table(self, items: pd.DataFrame) -> dict[str, torch.Tensor]:
        """Every catalogue item in item-row order (row 0 = padding)."""
        if len(items) != len(self.item_ids) or not (items.index.to_numpy() == np.asarray(self.item_ids)).all():
            items = items.reindex(self.item_ids)
        out = self._encode_table("item", self.item_features, items)
        out["item_row"] = np.arange(self.n_item_rows, dtype=np.int64)
        return _tensors(out)

    def _encode_table(self, side: str, specs: list[FeatureSpec], table: pd.DataFrame) -> dict[str, np.ndarray]:
        """Row 0 (the reserved padding / unknown row: every feature missing), then one row per table row.

        The same values as ``_encode_side`` on the table's records, column by column: a categorical
        value is looked up once per distinct value, a numeric column is converted as one array, so
        millions of users cost no per-row Python objects (multi-valued features still go row by row).
        """
        import pandas as pd

        out: dict[str, np.ndarray] = {}
        missing: dict[str, np.ndarray] = {}
        self._encode_side(side, specs, [None], missing)  # row 0
        for spec in specs:
            key = _feature_key(side, spec)
            if spec.name not in table.columns:
                out[key] = np.tile(missing[key], (len(table) + 1,) + (1,) * (missing[key].ndim - 1))
                continue
            col = table[spec.name]
            if spec.kind == "numeric" and pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
                mean, std = self.numeric_stats[key]
                arr = col.to_numpy(dtype=np.float64, na_value=np.nan)
                arr = np.where(np.isfinite(arr), (arr - mean) / std, 0.0)
                enc = np.clip(arr, -5.0, 5.0).astype(np.float32)
            elif spec.kind == "categorical" and _all_text(col):
                codes, uniques = pd.factorize(col, use_na_sentinel=True)  # NaN -> -1
                vocab = self.vocabs[key]
                lookup = np.array([vocab.row(_cat(u)) for u in uniques] + [vocab.row(_cat(None))], dtype=np.int64)
                enc = lookup[codes]  # code -1 picks the last entry: the missing value
            else:
                part: dict[str, np.ndarray] = {}
                self._encode_side(side, [spec], _records(table[[spec.name]], [spec]), part)
                enc = part[key]
            first = missing[key]
            if enc.ndim == 2 and first.shape[1] != enc.shape[1]:  # multi: pad to the wider bag
                width = max(first.shape[1], enc.shape[1])
                first = np.pad(first, ((0, 0), (0, width - first.shape[1])))
                enc = np.pad(enc, ((0, 0), (0, width - enc.shape[1])))
            out[key] = np.concatenate([first, enc])
        return out


def gather_rows(table: Mapping[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Select rows of an encoded table (from encode_user_table / encode_item_table)."""
    return {k: v.index_select(0, rows) for k, v in table.items()}


def _tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    import torch

    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def _is_frame(x: Any) -> bool:
    """A pandas DataFrame, found without importing pandas (if it is not imported, x is not one)."""
    pd = sys.modules.get("pandas")
    return pd is not None and isinstance(x, pd.DataFrame)


def pad_rows(seqs: Sequence[np.ndarray], width: int) -> np.ndarray:
    """(B, width) matrix, sequences left-aligned, 0-padded; longer ones keep their last ``width``."""
    mat = np.zeros((len(seqs), max(1, width)), dtype=np.int64)
    for i, s in enumerate(seqs):
        s = s[-width:]
        mat[i, : len(s)] = s
    return mat


def _records(df: pd.DataFrame, specs: list[FeatureSpec]) -> list[Mapping[str, Any] | None]:
    cols = [s.name for s in specs if s.name in df.columns]
    if not cols:
        return [None] * len(df)
    sub = df[cols]
    return [dict(zip(cols, vals, strict=True)) for vals in sub.itertuples(index=False, name=None)]


def _all_text(col: pd.Series) -> bool:
    """Every value a string or missing: distinct values are then distinct categories (factorize would
    merge 1, 1.0 and True, which ``_cat`` spells differently)."""
    import pandas as pd

    if pd.api.types.is_string_dtype(col.dtype) and col.dtype != object:
        return True
    return col.dtype == object and pd.api.types.infer_dtype(col, skipna=True) in ("string", "empty")


def _cat(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v).strip()


def _num(v: Any) -> float:
    if v is None or isinstance(v, bool):
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan
