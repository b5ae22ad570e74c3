"""FeatureEncoder: out-of-vocabulary rows, hashing, multi-valued bags, numeric normalisation, histories."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.factories import make_world
from towers.features import PAD, FeatureEncoder, Vocab
from towers.model import SideFeatures
from towers.schema import FeatureSpec


@pytest.fixture()
def world():
    return make_world(n_users=12, n_items=30, per_user=6)


@pytest.fixture()
def enc(world):
    return FeatureEncoder.fit(world.users, world.items, world.user_features, world.item_features, history_len=4)


def test_unknown_ids_and_values_map_to_the_oov_row(enc: FeatureEncoder) -> None:
    assert enc.user_row("1") == enc.user_row(1) >= 1  # "1" and 1 are the same user
    assert enc.user_row("no-such-user") == PAD
    assert enc.user_row(None) == PAD
    assert enc.item_row(5) == enc.item_row("5") >= 1
    assert enc.item_row(10_000) == PAD
    assert enc.item_row("not-an-int") == PAD  # int catalogue: a string id can only be unknown
    # a categorical value never seen at fit time gets row 0, a known one a real row
    batch = enc.encode_users(["1", "2"], [{"country": "atlantis", "age": 30.0}, {"country": "de", "age": 30.0}],
                             None)
    key = "user:categorical:country"
    assert batch[key].tolist()[0] == PAD
    assert batch[key].tolist()[1] >= 1


def test_hashing_for_vocabularies_too_large_to_enumerate() -> None:
    tokens = [f"tok{i}" for i in range(500)]
    v = Vocab.build(tokens, max_size=100, hash_buckets=64)
    assert v.hash_buckets == 64 and v.size == 65
    rows = v.rows(tokens)
    assert min(rows) >= 1 and max(rows) <= 64  # row 0 stays reserved for padding
    # stable across processes (crc32, not Python's salted hash) and across serialisation
    again = Vocab.from_dict(v.to_dict())
    assert again.rows(tokens) == rows
    assert v.row("never-seen") >= 1  # hashing has no OOV: an unseen token still lands in a bucket
    small = Vocab.build(tokens[:10], max_size=100)
    assert small.hash_buckets == 0 and small.size == 11


def test_multi_valued_features_pool_as_a_bag(enc: FeatureEncoder, world) -> None:
    items = world.items.iloc[:3].copy()
    items["tags"] = [("action", "drama"), ("action",), ()]
    batch = enc.encode_items(items)
    key = "item:multi:tags"
    mat = batch[key]
    assert mat.shape[0] == 3
    vocab = enc.vocabs[key]
    assert sorted(r for r in mat[0].tolist() if r) == sorted([vocab.row("action"), vocab.row("drama")])
    assert mat[2].tolist() == [PAD] * mat.shape[1]  # an empty bag is all padding

    spec = [(key, "multi", vocab.size)]
    for mode in ("mean", "sum"):
        torch.manual_seed(0)
        sf = SideFeatures(spec, feature_dim=4, pooling=mode)
        out = sf({key: mat})  # (3, 4)
        w = sf.tables["0"].weight
        a, d = w[vocab.row("action")], w[vocab.row("drama")]
        expect0 = (a + d) / 2 if mode == "mean" else a + d
        torch.testing.assert_close(out[0], expect0)
        torch.testing.assert_close(out[1], a)  # padding never dilutes the mean
        torch.testing.assert_close(out[2], torch.zeros(4))


def test_numeric_features_are_standardised_with_training_statistics(world) -> None:
    users = world.users.copy()
    users["age"] = [20.0, 40.0] * (len(users) // 2)
    enc = FeatureEncoder.fit(users, world.items, world.user_features, world.item_features)
    mean, std = enc.numeric_stats["user:numeric:age"]
    assert mean == pytest.approx(30.0) and std == pytest.approx(10.0)
    out = enc.encode_users(["1", "2", "3", "4"], [{"age": 20.0}, {"age": 50.0}, {"age": None}, {"age": 1e9}], None)
    assert out["user:numeric:age"].tolist() == pytest.approx([-1.0, 2.0, 0.0, 5.0])  # missing = mean, clipped


def test_history_keeps_the_most_recent_known_items(enc: FeatureEncoder) -> None:
    hist = [1, 2, 999_999, 3, 4, 5, 6]  # 999999 is not in the catalogue
    out = enc.encode_users(["1"], None, [hist])["hist"]
    assert out.shape == (1, 4)
    assert out[0].tolist() == enc.item_rows([3, 4, 5, 6]).tolist()
    empty = enc.encode_users(["1"], None, [[]])["hist"]
    assert empty.tolist() == [[PAD] * 4]


def test_encoder_round_trips_through_plain_data(enc: FeatureEncoder, world) -> None:
    import json

    again = FeatureEncoder.from_dict(json.loads(json.dumps(enc.to_dict())))
    a = enc.encode_items(world.items)
    b = again.encode_items(world.items)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k])
    assert again.meta() == enc.meta()


def test_string_item_ids_keep_their_type() -> None:
    w = make_world(n_users=5, n_items=10, per_user=3, str_item_ids=True)
    enc = FeatureEncoder.fit(w.users, w.items, w.user_features, w.item_features)
    assert not enc.item_id_is_int
    assert enc.item_row("sku-3") >= 1 and enc.item_row(3) == PAD
    assert enc.item_ids[0] == "sku-0"


def test_tables_encode_every_row_in_row_order(enc: FeatureEncoder, world) -> None:
    from towers.features import gather_rows

    table = enc.encode_item_table(world.items)
    assert table["item_row"].tolist() == list(range(enc.n_item_rows))
    some = world.items.iloc[[4, 1]]
    direct = enc.encode_items(some)
    gathered = gather_rows(table, torch.from_numpy(enc.item_rows(some.index)))
    for k in direct:
        d, g = direct[k], gathered[k]
        if d.dim() == 2:  # multi-valued bags may differ in padding width; compare the bags
            assert [sorted(x for x in r if x) for r in d.tolist()] == [sorted(x for x in r if x) for r in g.tolist()]
        else:
            assert torch.equal(d, g)
    users = enc.encode_user_table(world.users)
    assert users["user_row"].shape == (enc.n_user_rows,)


def test_feature_spec_kinds_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown feature kind"):
        FeatureSpec.from_dict({"name": "x", "kind": "vector"})


def _per_record(enc: FeatureEncoder, side: str, specs: list[FeatureSpec], table) -> dict[str, torch.Tensor]:
    """The table encoded the per-request way: one record per row (row 0: every feature missing)."""
    from towers.features import _records

    out: dict[str, Any] = {}  # _encode_side fills NumPy arrays
    enc._encode_side(side, specs, [None, *_records(table, specs)], out)
    return {k: torch.from_numpy(v) for k, v in out.items()}


@pytest.mark.parametrize("buckets", [0, 7])
def test_whole_tables_encode_exactly_like_one_record_at_a_time(buckets: int) -> None:
    import numpy as np
    import pandas as pd

    users = pd.DataFrame({
        "segment": pd.Series(["a", "b", None, "a", " c ", "zz"], dtype=object),   # text, a missing value, spaces
        "mixed": pd.Series([1, 1.0, "1", True, None, 2.5], dtype=object),         # 1, 1.0 and True spell differently
        "age": [20.0, np.nan, 31.0, np.inf, 44.0, 18.0],                           # numeric with NaN and inf
        "count": pd.Series([1, 2, 3, 4, 5, 6], dtype=np.int64),
        "tags": pd.Series([("x", "y"), (), None, ("y",), ("x", "y", "w"), "x|q"], dtype=object),
        "cat": pd.Categorical(["p", "q", "p", None, "q", "p"]),
    }, index=pd.Index([str(i) for i in range(1, 7)], dtype=object))
    specs = [FeatureSpec("segment", "categorical"), FeatureSpec("mixed", "categorical"),
             FeatureSpec("age", "numeric"), FeatureSpec("count", "numeric"), FeatureSpec("tags", "multi"),
             FeatureSpec("cat", "categorical"), FeatureSpec("absent", "categorical")]
    items = pd.DataFrame(index=pd.Index([1, 2], name="item_id"))
    enc = FeatureEncoder.fit(users.iloc[:4], items, specs, [], max_vocab=1000 if not buckets else 1,
                             hash_buckets=buckets or 50_000)
    enc = FeatureEncoder(user_features=specs, item_features=[], user_ids=list(users.index), item_ids=[1, 2],
                         item_id_is_int=True, vocabs=enc.vocabs, numeric_stats=enc.numeric_stats)
    got = enc.encode_user_table(users)
    want = _per_record(enc, "user", specs, users)
    assert set(want) <= set(got)
    for key, expected in want.items():
        assert torch.equal(got[key], expected), key
    # rows follow the encoder's user order, whatever the table's order
    shuffled = users.iloc[::-1]
    assert all(torch.equal(enc.encode_user_table(shuffled)[k], got[k]) for k in want)


def test_many_string_ids_travel_packed_and_come_back_the_same() -> None:
    import pandas as pd

    users = pd.DataFrame(index=pd.Index([f"u{i}" for i in range(12_000)], dtype=object))
    items = pd.DataFrame(index=pd.Index([f"sku-{i}" for i in range(12_000)], dtype=object))
    enc = FeatureEncoder.fit(users, items, [], [])
    d = enc.to_dict()
    assert isinstance(d["user_ids"], dict) and isinstance(d["item_ids"], dict)  # one string each
    back = FeatureEncoder.from_dict(d)
    assert back.user_ids == enc.user_ids and back.item_ids == enc.item_ids and not back.item_id_is_int
    assert back.user_row("u11999") == 12_000 and back.item_row("sku-0") == 1
    odd = FeatureEncoder.fit(pd.DataFrame(index=pd.Index(["a\x00b"] + [str(i) for i in range(12_000)], dtype=object)),
                             items, [], [])
    assert isinstance(odd.to_dict()["user_ids"], list)  # an id holding the separator: kept as a list
    assert FeatureEncoder.from_dict(odd.to_dict()).user_ids == odd.user_ids
