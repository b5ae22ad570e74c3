"""The retrieval pipeline as plain functions: resolve the user's input -> encode -> user tower ->
index search -> filter -> answer. Routes call these; nothing here knows about HTTP.

Two halves:
- ``resolve`` (event loop, cheap): merges the request with the bundle's profile/history/seen set and
  the user's recent events, decides tower vs popularity fallback, collects warnings.
- ``compute_batch`` (thread pool, heavy): one user-tower forward and one index search for a whole
  batch of resolved requests that share one bundle, then per-request filtering and JSON rendering.

The item tower is not needed at serve time: item vectors are already in the index.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _json_str
from pathlib import Path
from typing import Any

import numpy as np

from index.searcher import search_users
from service.events import UserEvents
from towers.neighbours import Neighbours

ItemId = int | str

# Over-fetch from the index by the number of excluded items so k survive the filter, but never more
# than this many extra (a user with 100k seen items must not turn every search into a full scan).
MAX_OVERFETCH = 4096
_MAX_LISTED = 10  # ids quoted in a warning


class InputError(ValueError):
    """Request content that validated structurally but does not fit the model (-> 422 naming the field)."""

    def __init__(self, loc: Sequence[str | int], msg: str, kind: str = "value_error") -> None:
        super().__init__(msg)
        self.loc, self.msg, self.kind = tuple(loc), msg, kind


# --------------------------------------------------------------------------------------------
# the bundle as the service sees it


@dataclass(eq=False)
class ServingBundle:
    """Everything one recall needs from one published bundle. Immutable once built; a request (or a
    micro-batch) holds one reference for its whole life, so it can never mix versions."""

    model_version: str
    index_version: str
    path: Path | None
    model: Any  # towers.checkpoint.TwoTowerModel with its user tower
    searcher: Any  # index.searcher.Searcher: search(queries (B, D) float32, k) -> (scores, faiss ids)
    id_map: Any  # index.searcher.IdMap: catalogue ids <-> FAISS ids
    popular: np.ndarray  # (P,) FAISS ids, most popular first
    popular_scores: np.ndarray  # (P,) float32, by rank: 1 - rank / P (popular.json holds an order, no counts)
    user_profile: Callable[[str], Mapping[str, Any] | None]  # user id -> feature values, None if unknown
    user_history: Callable[[str], Sequence[ItemId]]  # user id -> item ids, oldest first
    user_seen: Callable[[str], Iterable[ItemId]]  # user id -> every item the bundle data says they touched
    similar: Callable[[ItemId, int], tuple[np.ndarray, list[ItemId]]]  # item -> (scores, item ids), self excluded
    known_user: Callable[[str], bool]
    n_items: int
    extra: dict[str, Any] = field(default_factory=dict)
    # the last item's neighbours blended into recall (towers.neighbours), by row; None or weight 0: off
    neighbours: Neighbours | None = None
    neighbour_weight: float = 0.0
    item_vectors: np.ndarray | None = None  # (N, D) by row: tower scores of neighbours the search missed

    @functools.cached_property
    def versions_json(self) -> str:
        """'"model_version":"...","index_version":"..."}': the usual tail of an answer."""
        return json.dumps({"model_version": self.model_version, "index_version": self.index_version},
                          separators=(",", ":"))[1:]

    @property
    def user_features(self) -> dict[str, str]:
        """feature name -> kind, for validating inline features."""
        return {s.name: s.kind for s in self.model.encoder.user_features}

    def parse_item(self, item_id: Any) -> ItemId | None:
        """A wire item id in the catalogue's type, None when it is not in this bundle's catalogue."""
        hit = self.id_map.lookup(item_id)
        return hit[0] if hit is not None else None


# --------------------------------------------------------------------------------------------
# request -> resolved input


@dataclass
class RecallQuery:
    """A validated recall request, transport-independent."""

    user_id: str | None = None
    history: list[Any] | None = None
    features: dict[str, Any] | None = None
    k: int = 100
    exclude_seen: bool = True
    exclude_ids: list[Any] | None = None

    def canonical(self) -> bytes:
        """The request reduced to what determines the answer, as stable bytes for the cache key.

        Ids are stringified (7 and "7" are the same id everywhere on the wire), exclusions sorted
        and de-duplicated, features sorted by name.
        """
        # fields joined by "|", each JSON-encoded (so no field can forge the separator); the common
        # request (a user id and k) skips json.dumps of empty parts: this runs on every cached hit
        parts = [json.dumps(self.user_id) if self.user_id is not None else "-",
                 "-" if self.history is None else json.dumps([str(h) for h in self.history]),
                 "-" if self.features is None else json.dumps(
                     sorted((k, list(v) if isinstance(v, (list, tuple)) else v) for k, v in self.features.items())),
                 str(int(self.k)), "1" if self.exclude_seen else "0",
                 json.dumps(sorted({str(x) for x in self.exclude_ids})) if self.exclude_ids else "-"]
        return "|".join(parts).encode()


@dataclass
class Resolved:
    bundle: ServingBundle
    k: int
    fallback: bool
    user_id: str | None = None
    features: dict[str, Any] | None = None
    history: list[ItemId] = field(default_factory=list)
    exclude: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))  # FAISS ids, sorted unique
    warnings: list[str] = field(default_factory=list)


def _listed(ids: Sequence[Any]) -> str:
    shown = ", ".join(repr(i) for i in ids[:_MAX_LISTED])
    return shown + (f" and {len(ids) - _MAX_LISTED} more" if len(ids) > _MAX_LISTED else "")


def _check_features(bundle: ServingBundle, features: Mapping[str, Any], warnings: list[str]) -> dict[str, Any]:
    kinds = bundle.user_features
    out: dict[str, Any] = {}
    unknown = []
    for name, value in features.items():
        kind = kinds.get(name)
        if kind is None:
            unknown.append(name)
            continue
        if value is None:
            out[name] = None
        elif kind == "numeric":
            if isinstance(value, bool) or isinstance(value, list):
                raise InputError(("body", "features", name), f"feature {name!r} is numeric: give a number")
            try:
                num = float(value)
            except (TypeError, ValueError):
                raise InputError(("body", "features", name),
                                 f"feature {name!r} is numeric: {value!r} is not a number") from None
            if not math.isfinite(num):
                raise InputError(("body", "features", name), f"feature {name!r} must be a finite number")
            out[name] = num
        elif kind == "multi":
            out[name] = tuple(str(v) for v in value) if isinstance(value, list) else value
        else:
            if isinstance(value, list):
                raise InputError(("body", "features", name),
                                 f"feature {name!r} is categorical: give one value, not a list")
            out[name] = value
    if unknown:
        warnings.append(f"features: unknown feature names ignored: {_listed(sorted(unknown))} "
                        f"(this model knows: {', '.join(sorted(kinds)) or 'none'})")
    return out


def _map_ids(bundle: ServingBundle, ids: Iterable[Any], what: str, warnings: list[str] | None
             ) -> tuple[list[ItemId], list[int]]:
    """Wire ids -> (ids in the catalogue's type, their FAISS ids), unknown ones dropped (and, when
    ``warnings`` is given, listed there)."""
    lookup = bundle.id_map.lookup
    known: list[ItemId] = []
    fids: list[int] = []
    unknown: list[Any] = []
    for i in ids:
        hit = lookup(i)
        if hit is None:
            unknown.append(i)
        else:
            known.append(hit[0])
            fids.append(hit[1])
    if unknown and warnings is not None:
        warnings.append(f"{what}: unknown item ids ignored: {_listed(unknown)}")
    return known, fids


def resolve(bundle: ServingBundle, q: RecallQuery, events: UserEvents | None) -> Resolved:
    """Merge request, bundle data and recent events into the tower's input and the exclusion set.
    (``events`` is None when they could not be read, Redis being down: the bundle's data alone.)"""
    warnings: list[str] = []
    uid = q.user_id
    known = uid is not None and bundle.known_user(uid)
    ev_items, ev_fids = _map_ids(bundle, events.items, "events", None) if events else ([], [])

    # history: inline replaces what the service knows; otherwise bundle history + newer events
    hist_fids: list[int] | None = None
    if q.history is not None:
        history, hist_fids = _map_ids(bundle, q.history, "history", warnings)
    else:
        history = list(bundle.user_history(uid)) if known and uid is not None else []
        history.extend(ev_items)

    # features: the stored profile, overridden feature by feature by the request
    profile = dict(bundle.user_profile(uid) or {}) if known and uid is not None else {}
    inline = _check_features(bundle, q.features, warnings) if q.features else {}
    profile.update(inline)

    fallback = not known and not history and not inline
    excl: list[int] = []
    if q.exclude_ids:
        excl.extend(_map_ids(bundle, q.exclude_ids, "exclude_ids", warnings)[1])
    if q.exclude_seen:
        # everything the user touched: the history the tower sees, every item the bundle's data
        # has for them, and every item of their events (not only the recent window)
        excl.extend(hist_fids if hist_fids is not None else _map_ids(bundle, history, "", None)[1])
        if known and uid is not None:
            excl.extend(_map_ids(bundle, bundle.user_seen(uid), "", None)[1])
        if events is not None:
            excl.extend(ev_fids)
            excl.extend(_map_ids(bundle, events.seen, "", None)[1])
    exclude = np.asarray(sorted(set(excl)), dtype=np.int64)  # sorted unique (np.unique: ~15 us for 5 ids)
    return Resolved(bundle=bundle, k=q.k, fallback=fallback, user_id=uid,
                    features=profile or None, history=history, exclude=exclude, warnings=warnings)


# --------------------------------------------------------------------------------------------
# resolved inputs -> answers (runs in the thread pool)


_ITEM_INT = '{"item_id":%d,"score":%.6f}'
_ITEM_STR = '{"item_id":%s,"score":%.6f}'
_TEMPLATES: dict[tuple[bool, int], str] = {}


def _items_template(str_ids: bool, n: int) -> str:
    """'{"item_id":%d,"score":%.6f},...' n times: one %-format call renders a whole item list."""
    t = _TEMPLATES.get((str_ids, n))
    if t is None:
        t = ",".join([_ITEM_STR if str_ids else _ITEM_INT] * n)
        if len(_TEMPLATES) < 4096:
            _TEMPLATES[(str_ids, n)] = t
    return t


def render(ids: Sequence[ItemId], scores: Sequence[float] | np.ndarray, bundle: ServingBundle,
           fallback: bool = False, warnings: Sequence[str] = ()) -> bytes:
    """The JSON answer without "cached"; ``with_cached`` splices that in, so a cached body is reused
    byte for byte.

    The item list is rendered by one %-format over a template of the list's length: per-item
    f-strings with ``repr`` of each float took ~150 us per 100 items (float repr alone ~1 us each),
    the single format call ~30 us. Scores carry 6 decimals (float32 holds ~7 significant digits).
    Integer ids need no escaping; string ids go through the C JSON string encoder.
    """
    items = _items_json(ids, scores)
    if fallback or warnings:
        tail: dict[str, Any] = {"model_version": bundle.model_version, "index_version": bundle.index_version}
        if fallback:
            tail["fallback"] = "popular"
        if warnings:
            tail["warnings"] = list(warnings)
        rest = json.dumps(tail, separators=(",", ":"))[1:]
    else:
        rest = bundle.versions_json  # the common tail, encoded once per bundle
    return f'{{"items":[{items}],{rest}'.encode()


def _items_json(ids: Sequence[ItemId], scores: Sequence[float] | np.ndarray) -> str:
    """The inside of an answer's "items" array: '{"item_id":7,"score":0.812345},...'."""
    sc = np.asarray(scores, dtype=np.float64)
    if len(ids) != len(sc):
        raise ValueError(f"{len(ids)} ids for {len(sc)} scores")
    if not np.isfinite(sc).all():
        raise ValueError("non-finite score in an answer")
    if not ids:
        return ""
    str_ids = isinstance(ids[0], str)
    flat: list[Any] = [None] * (2 * len(ids))
    flat[::2] = [_json_str(str(i)) for i in ids] if str_ids else ids
    flat[1::2] = sc.tolist()
    return _items_template(str_ids, len(ids)) % tuple(flat)


def with_cached(body: bytes, cached: bool) -> bytes:
    return body[:-1] + (b',"cached":true}' if cached else b',"cached":false}')


def _not_excluded(fids: np.ndarray, exclude: np.ndarray) -> np.ndarray:
    """Mask of ``fids`` not in ``exclude`` (sorted unique, non-empty): a binary search per id, ~4 us
    for 100 ids (np.isin sorts both arrays: ~25 us even for 5 exclusions)."""
    pos = np.searchsorted(exclude, fids)
    np.minimum(pos, len(exclude) - 1, out=pos)
    return exclude[pos] != fids


def _kept(fids: np.ndarray, excludes: Sequence[np.ndarray]) -> np.ndarray:
    """(B, F) mask of search results to keep: real results (id >= 0) not excluded for their row.
    Few exclusions (the usual: a short history) are compared for the whole batch at once."""
    keep = fids >= 0
    widest = max((len(e) for e in excludes), default=0)
    if 0 < widest <= 32:
        table = np.full((len(excludes), widest), -2, dtype=np.int64)  # -2 matches no id
        for j, e in enumerate(excludes):
            table[j, : len(e)] = e
        keep &= (fids[:, :, None] != table[:, None, :]).all(axis=2)  # (B, F, E) comparisons
    elif widest:
        for j, e in enumerate(excludes):
            if len(e):
                keep[j] &= _not_excluded(fids[j], e)
    return keep


def _popular(r: Resolved) -> bytes:
    b = r.bundle
    need = r.k + len(r.exclude)
    fids, scores = b.popular[:need], b.popular_scores[:need]
    if len(r.exclude):
        keep = _not_excluded(fids, r.exclude)
        fids, scores = fids[keep], scores[keep]
    fids, scores = fids[: r.k], scores[: r.k]
    return render(b.id_map.to_items(fids), scores, b, fallback=True, warnings=r.warnings)


def blend_neighbours(b: ServingBundle, users: np.ndarray, scores: np.ndarray, fids: np.ndarray,
                     histories: Sequence[Sequence[ItemId]]) -> tuple[np.ndarray, np.ndarray]:
    """Search results re-ranked by tower score + weight * ``Neighbours.bonus`` for the neighbours of each
    user's last history item (towers.neighbours; training/blend.py ranks the offline evaluation the
    same way), best first. Every neighbour is scored exactly (the search may not have returned it).

    The top k stay exact: an item that is neither a neighbour nor in the user's true tower top
    ``fetch`` (k + the exclusions) has no bonus and a tower score at most those items', at least k of
    which survive the filters.
    Returns (B, F + top) arrays, padded with id -1 / score -inf.
    """
    assert b.neighbours is not None and b.item_vectors is not None
    nb, w = b.neighbours, np.float32(b.neighbour_weight)
    last = np.full(len(histories), -1, dtype=np.int64)  # (B,) rows of the last items; -1: no history
    has = [j for j, h in enumerate(histories) if len(h)]
    last[has] = b.id_map.rows_of([histories[j][-1] for j in has])
    q, rows, bonus = nb.bonus(last)
    if not len(q):
        return scores, fids
    width = fids.shape[1] + int(np.bincount(q).max())
    out_s = np.full((len(fids), width), -np.inf, dtype=np.float32)
    out_f = np.full((len(fids), width), -1, dtype=np.int64)
    bounds = np.searchsorted(q, np.arange(len(fids) + 1))  # q is sorted: each user's neighbours
    u3 = users if users.ndim == 3 else users[:, None, :]  # (B, K, D)
    for j in range(len(fids)):
        f, s = fids[j], scores[j].astype(np.float32, copy=True)
        nr, nbon = rows[bounds[j]:bounds[j + 1]], bonus[bounds[j]:bounds[j + 1]]
        if len(nr):
            nf = b.id_map.faiss_ids[nr]
            # each neighbour's exact tower score, the best interest's inner product: a multi-interest
            # search lists an item that only a weaker interest found with that interest's lower score
            vec = np.asarray(b.item_vectors[nr], dtype=np.float32)  # (E, D)
            blended = ((vec @ u3[j].T).max(axis=1) + w * nbon).astype(np.float32)  # (E,)
            order = np.argsort(f, kind="stable")
            at = np.minimum(np.searchsorted(f, nf, sorter=order), len(f) - 1)
            found = f[order[at]] == nf
            s[order[at[found]]] = blended[found]
            f, s = np.concatenate([f, nf[~found]]), np.concatenate([s, blended[~found]])
        order = np.argsort(-s, kind="stable")
        out_s[j, :len(s)], out_f[j, :len(s)] = s[order], f[order]
    return out_s, out_f


def compute_batch(reqs: list[Resolved]) -> list[bytes]:
    """One tower forward and one index search for every tower request of the batch (all share one
    bundle: the micro-batcher groups by bundle)."""
    if not reqs:
        return []
    b = reqs[0].bundle
    out: list[bytes | None] = [None] * len(reqs)
    tower = [i for i, r in enumerate(reqs) if not r.fallback]
    for i, r in enumerate(reqs):
        if r.fallback:
            out[i] = _popular(r)
    if tower:
        rs = [reqs[i] for i in tower]
        users = b.model.embed_users([r.user_id for r in rs], [r.features for r in rs],
                                    [r.history for r in rs])  # (B, D) float32, L2-normalised; (B, K, D) interests
        fetch = min(b.n_items, max(r.k + min(len(r.exclude), MAX_OVERFETCH) for r in rs))
        scores, fids = search_users(b.searcher, users, fetch)  # (B, fetch), or (B, K * fetch) merged
        if b.neighbours is not None and b.neighbour_weight > 0:
            scores, fids = blend_neighbours(b, users, scores, fids, [r.history for r in rs])
        keep = _kept(fids, [r.exclude for r in rs])  # (B, fetch)
        for j, (i, r) in enumerate(zip(tower, rs, strict=True)):
            idx = np.flatnonzero(keep[j])[: r.k]
            out[i] = render(b.id_map.to_items(fids[j, idx]), scores[j, idx], b, warnings=r.warnings)
    return [o if o is not None else b"" for o in out]


def compute_similar(b: ServingBundle, item_id: ItemId, k: int) -> bytes:
    """The similar-items answer without "cached", its item list written as a recall's is."""
    scores, items = b.similar(item_id, k)
    head = json.dumps({"item_id": item_id}, separators=(",", ":"))[:-1]
    return f'{head},"items":[{_items_json(items, scores)}],{b.versions_json}'.encode()
