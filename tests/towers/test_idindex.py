"""The compact user-id index behaves as the dict it replaced: row of every id, 0 for anything else,
even when two ids share a hash."""

import numpy as np
import pytest

from towers.features import FeatureEncoder
from towers.idindex import IdIndex


def _as_dict(ids: list[str]) -> dict[str, int]:
    return {u: i + 1 for i, u in enumerate(ids)}


IDS = ["u1", "7", "é", "ß中", "", " x", "007", "a" * 300] + [f"user-{i}" for i in range(5000)]


def test_rows_match_a_dict_for_known_and_unknown_keys():
    ix = IdIndex.of(IDS)
    d = _as_dict(IDS)
    keys = IDS[::-1] + ["u2", "07", "x", "ß", "user-5000", "a" * 299]
    assert ix.rows(keys).tolist() == [d.get(k, 0) for k in keys]
    assert [ix[i] for i in range(len(IDS))] == IDS == ix.tolist()
    assert ix.row("007") == 7 and ix.row("7") == 2 and ix.row("nobody") == 0
    assert ix.rows([]).shape == (0,)


def test_non_string_keys_are_never_ids():
    # hash(7) and hash("7") differ, and an int that happened to share a hash must not match by value
    ix = IdIndex.of(["7", "8"])
    assert ix.rows([7, None, 8.0, "8"]).tolist() == [0, 0, 0, 2]


def test_ids_sharing_a_hash_are_told_apart():
    # every id given the same hash: the index must compare the ids themselves
    ids = ["alpha", "beta", "gamma"]
    starts = np.array([0, 6, 11, 17])
    ix = IdIndex("\x00".join(ids), starts, hashes=np.zeros(3, dtype=np.int64))
    assert [ix._scan(k, 0, 0) for k in ["alpha", "beta", "gamma", "delta"]] == [1, 2, 3, 0]
    # and through rows(): a key whose hash equals the shared one but is not an id
    same = IdIndex("\x00".join(ids), starts, hashes=np.full(3, hash("gamma"), dtype=np.int64))
    assert same.rows(["gamma", "alpha"]).tolist() == [3, 0]  # "alpha" hashes elsewhere: not found


def test_packed_form_round_trips_without_a_list():
    ix = IdIndex.of(IDS)
    packed = ix.packed()
    assert packed is not None and packed["count"] == len(IDS)
    back = IdIndex.joined(packed["joined"], packed["count"])
    assert back.tolist() == IDS and back.rows(IDS).tolist() == list(range(1, len(IDS) + 1))
    with pytest.raises(ValueError, match="expected"):
        IdIndex.joined(packed["joined"], len(IDS) + 1)
    assert IdIndex.of(["a\x00b", "c"]).packed() is None  # an id holding the separator cannot be joined
    assert len(IdIndex.joined("", 0)) == 0


def test_encoder_keeps_user_rows_through_a_checkpoint_dict():
    enc = FeatureEncoder(user_features=[], item_features=[], user_ids=[f"u{i}" for i in range(20_000)],
                         item_ids=[1, 2], item_id_is_int=True, vocabs={}, numeric_stats={})
    d = enc.to_dict()
    assert isinstance(d["user_ids"], dict)  # packed: one string, not 20k objects
    back = FeatureEncoder.from_dict(d)
    assert back.user_ids == enc.user_ids
    assert back.user_rows(["u0", " u19999 ", "u20000", None, True]).tolist() == [1, 20_000, 0, 0, 0]
    assert back.user_row(5) == 0 and back.n_user_rows == 20_001
