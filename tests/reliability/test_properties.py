"""Property tests (hypothesis) for the two pure functions every request goes through: feature encoding
(arbitrary ids and values never crash, unknowns land on row 0, 7 and "7" are one user) and the result
cache key (equal for requests that mean the same thing, different for ones that do not, always in
the deployment's namespace)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from service.cache import cache_key
from service.events import RedisEventStore
from service.pipeline import RecallQuery
from service.redisconn import RedisGuard
from tests.factories import make_model, make_world
from towers.features import PAD
from towers.schema import normalize_user_id

PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def model():
    return make_model(make_world(n_users=30, n_items=60, per_user=5, seed=4), seed=4)


@pytest.fixture(scope="module")
def str_model():
    return make_model(make_world(n_users=10, n_items=30, per_user=4, seed=5, str_item_ids=True), seed=5)


# anything a JSON body, a Parquet cell or a careless caller could hand over
anything = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.lists(st.one_of(st.text(max_size=8), st.integers(), st.none()), max_size=4),
    st.tuples(st.text(max_size=5)), st.sampled_from(["7", " 7 ", "07", "7.0", "", " ", "\x00", "de", "action"]),
)


# ---------------------------------------------------------------------------------------------
# feature encoding


@PROPS
@given(uid=anything)
def test_any_user_id_encodes_to_a_valid_row_and_unknown_ones_to_row_0(model, uid: Any) -> None:
    enc = model.encoder
    row = enc.user_row(uid)
    assert 0 <= row < enc.n_user_rows
    try:
        norm = normalize_user_id(uid)
    except (ValueError, TypeError):
        norm = None
    if norm is None or norm not in enc.user_ids:
        assert row == PAD
    else:
        assert enc.user_ids[row - 1] == norm


@PROPS
@given(n=st.integers(min_value=-5, max_value=40), pad=st.sampled_from(["", " ", "  \t"]))
def test_a_user_id_as_int_str_float_or_padded_str_is_the_same_user(model, n: int, pad: str) -> None:
    enc = model.encoder
    rows = {enc.user_row(n), enc.user_row(str(n)), enc.user_row(float(n)), enc.user_row(f"{pad}{n}{pad}")}
    assert len(rows) == 1
    assert normalize_user_id(n) == normalize_user_id(str(n)) == normalize_user_id(float(n))
    a = enc.encode_users([n], None, [[1, 2]])
    b = enc.encode_users([str(n)], None, [["1", "2"]])
    assert all(torch.equal(a[k], b[k]) for k in a)


@PROPS
@given(item=anything)
def test_any_item_id_encodes_to_a_valid_row_in_either_catalogue(model, str_model, item: Any) -> None:
    for m in (model, str_model):
        enc = m.encoder
        row = enc.item_row(item)
        assert 0 <= row < enc.n_item_rows
        if row != PAD:
            assert enc.item_row(enc.item_ids[row - 1]) == row
    # integer catalogue: 7, "7", " 7 " and 7.0 are one item; anything else non-integral is unknown
    enc = model.encoder
    if isinstance(item, int) and not isinstance(item, bool):
        assert enc.item_row(item) == enc.item_row(str(item)) == enc.item_row(f" {item} ")
    if isinstance(item, str) and not item.strip().lstrip("-").isdigit():
        assert enc.item_row(item) == PAD


feature_values = st.dictionaries(st.sampled_from(["age", "country", "shoe_size", ""]), anything, max_size=4)


@PROPS
@given(batch=st.lists(st.tuples(anything, st.one_of(st.none(), feature_values),
                                st.lists(anything, max_size=15)), min_size=1, max_size=6))
def test_encoding_and_the_user_tower_never_crash_and_stay_finite(model, batch: list[tuple[Any, Any, Any]]) -> None:
    enc = model.encoder
    uids = [b[0] for b in batch]
    feats = [b[1] for b in batch]
    hists = [b[2] for b in batch]
    out = enc.encode_users(uids, feats, hists)
    n = len(batch)
    assert out["user_row"].shape == (n,)
    assert out["hist"].shape == (n, enc.history_len)
    assert int(out["hist"].min()) >= 0 and int(out["hist"].max()) < enc.n_item_rows
    for key, t in out.items():
        assert t.shape[0] == n, key
        if t.is_floating_point():  # standardised numeric features: finite and clipped
            assert torch.isfinite(t).all() and float(t.abs().max()) <= 5.0, key
    vec = model.embed_users(uids, feats, hists)  # (B, D)
    assert vec.shape == (n, model.dim) and np.isfinite(vec).all()
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# cache keys

item_ids = st.one_of(st.integers(min_value=0, max_value=500), st.text(min_size=1, max_size=6))
FIELDS = {
    "user_id": st.one_of(st.none(), st.integers(min_value=0, max_value=99).map(str), st.text(min_size=1, max_size=6)),
    "history": st.one_of(st.none(), st.lists(item_ids, max_size=5)),
    "features": st.one_of(st.none(), st.dictionaries(
        st.sampled_from(["age", "country", "tags"]),
        st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=4),
                  st.lists(st.text(max_size=3), max_size=3)), max_size=3)),
    "k": st.integers(min_value=1, max_value=1000),
    "exclude_seen": st.booleans(),
    "exclude_ids": st.one_of(st.none(), st.lists(item_ids, max_size=6)),
}
queries = st.builds(RecallQuery, **FIELDS)


def _key(q: RecallQuery, version: str = "20250101T000000Z-000001", prefix: str = "tt") -> str:
    return cache_key(prefix, version, q.canonical())


def _flip(x: Any) -> Any:
    """7 <-> "7": the same id on the wire."""
    if isinstance(x, int):
        return str(x)
    if isinstance(x, str) and x.isascii() and x.isdigit() and str(int(x)) == x:
        return int(x)
    return x


def _meaning(q: RecallQuery) -> tuple[Any, ...]:
    """What decides the answer, written independently of the service's canonical form."""
    feats = None
    if q.features:
        feats = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in q.features.items()))
    return (q.user_id, None if q.history is None else tuple(str(h) for h in q.history), feats, q.k,
            q.exclude_seen, frozenset(str(x) for x in q.exclude_ids or ()))


@PROPS
@given(q=queries, data=st.data())
def test_requests_that_mean_the_same_share_one_cache_key(q: RecallQuery, data: st.DataObject) -> None:
    excl = None
    if q.exclude_ids is not None:
        # order and repetition of exclusions do not matter, nor does 7 vs "7"
        excl = data.draw(st.permutations([_flip(x) for x in q.exclude_ids] + q.exclude_ids[:2]))
    same = RecallQuery(
        user_id=normalize_user_id(int(q.user_id)) if q.user_id and _flip(q.user_id) != q.user_id else q.user_id,
        history=None if q.history is None else [_flip(h) for h in q.history],
        features=None if q.features is None else dict(reversed(list(q.features.items()))),
        k=q.k, exclude_seen=q.exclude_seen, exclude_ids=excl)
    assert _meaning(same) == _meaning(q)
    assert _key(same) == _key(q)


@PROPS
@given(a=queries, field=st.sampled_from(list(FIELDS)), data=st.data())
def test_requests_that_mean_different_things_never_share_a_key(a: RecallQuery, field: str,
                                                                data: st.DataObject) -> None:
    # a neighbour: the same request with one field drawn afresh (the near misses matter most)
    b = RecallQuery(**{**a.__dict__, field: data.draw(FIELDS[field])})
    assume(_meaning(a) != _meaning(b))
    assert _key(a) != _key(b)


@PROPS
@given(q=queries, k2=st.integers(min_value=1, max_value=1000))
def test_k_filters_and_history_order_change_the_key(q: RecallQuery, k2: int) -> None:
    assume(k2 != q.k)
    base = _key(q)
    assert _key(RecallQuery(**{**q.__dict__, "k": k2})) != base
    assert _key(RecallQuery(**{**q.__dict__, "exclude_seen": not q.exclude_seen})) != base
    if q.history and len({str(h) for h in q.history}) > 1:
        # the user tower reads the history in order: a reordered history is another request
        rev = list(reversed(q.history))
        if [str(h) for h in rev] != [str(h) for h in q.history]:
            assert _key(RecallQuery(**{**q.__dict__, "history": rev})) != base


@PROPS
@given(q=queries, prefix=st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True),
       v1=st.from_regex(r"2025[0-9]{4}T[0-9]{6}Z-[0-9a-f]{6}", fullmatch=True),
       v2=st.from_regex(r"2025[0-9]{4}T[0-9]{6}Z-[0-9a-f]{6}", fullmatch=True))
def test_keys_are_namespaced_by_prefix_and_index_version(q: RecallQuery, prefix: str, v1: str, v2: str) -> None:
    k1 = _key(q, v1, prefix)
    assert k1.startswith(f"{prefix}:v1:rec:{v1}:")
    if v2 != v1:
        assert _key(q, v2, prefix) != k1  # a new bundle never serves an old bundle's answers
    assert _key(q, v1, prefix + "x") != k1


@PROPS
@given(uid=st.text(min_size=1, max_size=30), prefix=st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True))
def test_event_keys_stay_in_the_namespace_whatever_the_user_id(uid: str, prefix: str) -> None:
    store = RedisEventStore(RedisGuard(None), prefix, cap=10, ttl_s=0)
    key = store.seq_key(uid)
    assert key is not None and key.startswith(f"{prefix}:v1:evseq:")
    assert key[len(f"{prefix}:v1:evseq:"):] == uid  # the id is the tail: no two users share a key
    assert not key.startswith(f"{prefix}:v1:rec:")
