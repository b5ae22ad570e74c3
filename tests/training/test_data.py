"""Data loading: synthetic generator, MovieLens-100k/1M, CSV/Parquet, bad-data errors, the split."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from towers.schema import DataError, FeatureSpec
from training.data import SYNTHETIC_SIZES, RecData, load_data, split_leave_last_out
from training.synthetic import make_synthetic

# the shared data sets sit beside the checkout (../shared/data), wherever the checkout is
ML100K = Path(__file__).resolve().parents[3] / "shared" / "data" / "ml-100k"


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


def _check_contract(d: RecData) -> None:
    """The dtypes every consumer of RecData relies on."""
    inter = d.interactions
    assert list(inter.columns) == ["user_id", "item_id", "timestamp", "weight"]
    assert inter["user_id"].dtype == object and all(isinstance(u, str) for u in inter["user_id"].head(50))
    assert inter["timestamp"].dtype == np.int64 and inter["weight"].dtype == np.float64
    assert d.users.index.dtype == object and d.users.index.name == "user_id"
    assert d.items.index.name == "item_id" and d.items.index.is_unique and d.users.index.is_unique
    assert inter["user_id"].isin(d.users.index).all() and inter["item_id"].isin(d.items.index).all()
    for spec in d.item_features:
        assert spec.name in d.items.columns
    for spec in d.user_features:
        assert spec.name in d.users.columns


# ----------------------------------------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic_per_seed_and_follows_the_contract() -> None:
    a = load_data("synthetic", seed=3, size="tiny")
    b = load_data("synthetic", seed=3, size="tiny")
    c = load_data("synthetic", seed=4, size="tiny")
    _check_contract(a)
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.items, b.items)
    pd.testing.assert_frame_equal(a.users, b.users)
    assert a.truth == b.truth
    assert not a.interactions.equals(c.interactions)
    assert a.items.index.dtype == np.int64
    assert a.dropped == {}


def test_synthetic_sizes_and_explicit_counts() -> None:
    d = load_data("synthetic", size="tiny", n_users=150, n_clusters=3)
    assert len(d.users) == 150 and len(d.items) == 120
    assert set(d.truth["item_cluster"].values()) == {0, 1, 2}
    mean = d.interactions.groupby("user_id").size().mean()
    assert 14 <= mean <= 26  # around interactions_per_user=20 of the tiny preset
    default = load_data("synthetic")
    assert len(default.users) == 2000 and len(default.items) == 1000
    assert 40_000 < len(default.interactions) < 80_000
    with pytest.raises(DataError, match="unknown synthetic size"):
        load_data("synthetic", size="huge")


def test_synthetic_has_the_cluster_structure_it_claims() -> None:
    d = make_synthetic(seed=0, n_users=600, n_items=600, n_clusters=4, interactions_per_user=20)
    truth = d.truth
    assert truth is not None and set(truth) == {"user_cluster", "user_clusters", "item_cluster"}
    inter = d.interactions
    item_c = inter["item_id"].map(truth["item_cluster"])
    in_own = [c in truth["user_clusters"][u] for u, c in zip(inter["user_id"], item_c, strict=True)]
    assert np.mean(in_own) > 0.9  # 5 % noise, the rest from the user's own clusters
    assert all(truth["user_cluster"][u] == cs[0] for u, cs in truth["user_clusters"].items())
    assert {len(cs) for cs in truth["user_clusters"].values()} == {1, 2}

    # features carry the cluster signal
    seg_match = np.mean([d.users.at[u, "segment"] == f"seg{c:02d}" for u, c in truth["user_cluster"].items()])
    assert seg_match > 0.7
    cat_cluster = pd.Series({i: c for i, c in truth["item_cluster"].items()})
    cat = d.items["category"].str[3:].astype(int) // 2
    assert (cat == cat_cluster.reindex(d.items.index)).mean() > 0.85
    assert all(isinstance(t, tuple) and 1 <= len(t) <= 3 for t in d.items["tags"])
    assert d.items["price"].dtype == np.float64 and (d.items["price"] > 0).all()
    assert d.users["age"].dtype == np.float64
    assert d.item_features == [FeatureSpec("category", "categorical"), FeatureSpec("tags", "multi"),
                               FeatureSpec("price", "numeric")]

    # power-law popularity: inside a cluster the head item is far more popular than the median item
    counts = inter.groupby("item_id").size().reindex(d.items.index, fill_value=0)
    c0 = counts[cat_cluster.reindex(d.items.index) == 0].sort_values(ascending=False)
    assert c0.iloc[0] > 8 * max(1, c0.median())
    top_tenth = counts.sort_values(ascending=False).iloc[: len(counts) // 10]
    assert top_tenth.sum() > 0.3 * counts.sum()  # long tail: 10 % of items take a third of the traffic

    # timestamps strictly increase per user and no user sees an item twice
    by_user = inter.sort_values(["user_id", "timestamp"], kind="stable")
    assert (by_user.groupby("user_id")["timestamp"].diff().dropna() > 0).all()
    assert not inter.duplicated(["user_id", "item_id"]).any()


def _fingerprint(d: RecData) -> str:
    """sha256 over every value the generator produced, as plain bytes (no pandas hashing)."""
    import hashlib

    h = hashlib.sha256()
    inter = d.interactions
    h.update("\x00".join(inter["user_id"]).encode())
    for col in ("item_id", "timestamp"):
        h.update(inter[col].to_numpy(dtype=np.int64).tobytes())
    h.update(inter["weight"].to_numpy(dtype=np.float64).tobytes())
    h.update("\x00".join(d.users.index).encode())
    h.update("\x00".join(d.users["segment"]).encode())
    h.update(d.users["age"].to_numpy(dtype=np.float64).tobytes())
    h.update(d.items.index.to_numpy(dtype=np.int64).tobytes())
    h.update("\x00".join(d.items["category"]).encode())
    h.update("\x00".join("|".join(t) for t in d.items["tags"]).encode())
    h.update(d.items["price"].to_numpy(dtype=np.float64).tobytes())
    assert d.truth is not None
    h.update(repr(sorted(d.truth["user_clusters"].items())).encode())
    h.update(repr(sorted(d.truth["item_cluster"].items())).encode())
    return h.hexdigest()


@pytest.mark.parametrize("options, digest", [
    ({"seed": 0, "n_users": 200, "n_items": 120, "n_clusters": 4, "interactions_per_user": 20},
     "f4c9fb6a1cbf1eaa679867f4b1660aeb5690ac4639383b8117e399bad61f7e0f"),
    ({"seed": 3, "n_users": 50, "n_items": 40, "n_clusters": 1, "interactions_per_user": 30, "noise": 0.2,
      "zipf_a": 0.5}, "a0ff0178f7b7fe0ce8466ac424742f734c1168e69909c4f47bda4b38505761a4"),
])
def test_synthetic_data_is_the_same_bit_for_bit_for_a_seed(options: dict, digest: str) -> None:
    """The digests are those of the generator before it was split into stages (commit 3bbdc66):
    every benchmark and saved model trained on synthetic data relies on a seed giving the same data.
    A change that means to alter the data updates them and says why."""
    assert _fingerprint(make_synthetic(**options)) == digest
    assert _fingerprint(load_data("synthetic", size="tiny", seed=0)) == \
        _fingerprint(make_synthetic(seed=0, **SYNTHETIC_SIZES["tiny"]))


# ----------------------------------------------------------------------------------------------- MovieLens

@pytest.mark.skipif(not (ML100K / "u.data").exists(), reason="MovieLens-100k not present")
def test_movielens_100k_loads_with_features() -> None:
    d = load_data(f"movielens:{ML100K}")
    _check_contract(d)
    assert d.name == "movielens-100k"
    assert (len(d.users), len(d.items), len(d.interactions)) == (943, 1682, 100_000)
    assert (d.interactions["weight"] == 1.0).all() and d.items.index.dtype == np.int64
    assert d.users.loc["1"].to_dict() == {"gender": "M", "age": "18-24", "occupation": "technician",
                                          "zip_prefix": "85"}
    toy = d.items.loc[1]
    assert toy["genres"] == ("Animation", "Children's", "Comedy") and toy["year"] == 1995.0
    assert toy["title"] == "Toy Story (1995)"
    assert np.isnan(d.items.loc[267, "year"])  # the "unknown" movie has no date
    assert max(len(g) for g in d.items["genres"]) > 1
    assert {s.kind for s in d.item_features} == {"multi", "numeric"}
    assert [s.name for s in d.user_features] == ["gender", "age", "occupation", "zip_prefix"]


def _ml1m_fixture(root: Path) -> Path:
    root.mkdir()
    _write(root / "ratings.dat", "1::10::5::978300760\n1::20::3::978302109\n2::10::4::978301968\n"
                                 "1::30::4::978300275\n2::20::1::978824291\n")
    _write(root / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072-1234\n")
    _write(root / "movies.dat", "10::GoldenEye (1995)::Action|Adventure|Thriller\n"
                                "20::Cité des enfants perdus, La (1995)::Adventure|Sci-Fi\n"
                                "30::Toy Story (1995)::Animation|Children's|Comedy\n"
                                "40::Never Rated (1998)::Drama\n", encoding="latin-1")
    return root


def test_movielens_1m_format(tmp_path: Path) -> None:
    d = load_data(f"movielens:{_ml1m_fixture(tmp_path / 'ml-1m')}")
    _check_contract(d)
    assert d.name == "movielens-1m"
    assert len(d.interactions) == 5 and list(d.users.index) == ["1", "2"]
    assert list(d.items.index) == [10, 20, 30, 40]  # movie 40 has no ratings but is in the catalogue
    assert d.users.loc["1"].to_dict() == {"gender": "F", "age": "Under 18", "occupation": "K-12 student",
                                          "zip_prefix": "48"}
    assert d.users.loc["2", "age"] == "56+" and d.users.loc["2", "occupation"] == "self-employed"
    assert d.items.loc[20, "genres"] == ("Adventure", "Sci-Fi")
    assert d.items.loc[20, "title"].startswith("Cité")  # latin-1 decoded
    assert d.items.loc[40, "year"] == 1998.0


def test_movielens_errors_name_file_line_and_column(tmp_path: Path) -> None:
    root = _ml1m_fixture(tmp_path / "ml-1m")
    _write(root / "ratings.dat", "1::10::5::978300760\n1::2x::3::978302109\n")
    with pytest.raises(DataError, match=r"ratings\.dat, line 2, column 'item_id'"):
        load_data(f"movielens:{root}")
    _write(root / "ratings.dat", "1::10::5::978300760\n1::99::3::978302109\n")
    with pytest.raises(DataError, match=r"ratings\.dat, line 2, column 'item_id': item_id 99 is not in movies\.dat"):
        load_data(f"movielens:{root}")
    _write(root / "ratings.dat", "1::10::5::978300760\n1::20::3::978302109::7\n")
    with pytest.raises(DataError, match=r"ratings\.dat, line 2: expected 4"):
        load_data(f"movielens:{root}")
    _write(root / "ratings.dat", "1::10::5::978300760\n")
    _write(root / "users.dat", "1::F::1::10::48067\n1::M::56::16::70072\n")
    with pytest.raises(DataError, match=r"users\.dat, line 2, column 'user_id': duplicate user_id '1'"):
        load_data(f"movielens:{root}")
    with pytest.raises(DataError, match="no MovieLens files"):
        load_data(f"movielens:{tmp_path}")


def _latest_fixture(root: Path) -> Path:
    """A MovieLens "latest" directory (ml-latest-small / 20M / 25M / 32M format) in miniature."""
    root.mkdir()
    _write(root / "ratings.csv", "userId,movieId,rating,timestamp\n1,10,4.0,964982703\n1,20,3.5,964981247\n"
                                 "2,10,5.0,964982224\n1,30,0.5,964983815\n2,30,4.5,964982931\n")
    _write(root / "movies.csv", 'movieId,title,genres\n10,GoldenEye (1995),Action|Adventure|Thriller\n'
                                '20,"American President, The (1995)",Comedy|Drama|Romance\n'
                                '30,Toy Story (1995),Animation|Children|Comedy\n'
                                '40,Some Short (2017),(no genres listed)\n')
    _write(root / "tags.csv", "userId,movieId,tag,timestamp\n1,10,Bond,1445714994\n2,10,bond ,1445714996\n"
                              "2,10,spy,1445714992\n1,20,Spy,1445715001\n2,30,bond,1445715054\n"
                              "2,20,politics,1445715100\n")
    return root


def test_movielens_latest_csv_format(tmp_path: Path) -> None:
    d = load_data(f"movielens:{_latest_fixture(tmp_path / 'ml-32m')}")
    _check_contract(d)
    assert d.name == "movielens-ml-32m"
    assert len(d.interactions) == 5 and list(d.users.index) == ["1", "2"] and d.users.columns.empty
    assert list(d.items.index) == [10, 20, 30, 40]  # movie 40 has no ratings but is in the catalogue
    assert (d.interactions["weight"] == 1.0).all()  # every rating is a watch, 0.5 stars too
    assert d.items.loc[20, "title"] == "American President, The (1995)"  # quoted comma kept in the title
    assert d.items.loc[10, "genres"] == ("Action", "Adventure", "Thriller") and d.items.loc[20, "year"] == 1995.0
    assert d.items.loc[40, "genres"] == ()  # "(no genres listed)" is no genre
    # tags: case and spaces folded, most applied first; "politics", on one movie only, is dropped
    assert d.items.loc[10, "tags"] == ("bond", "spy") and d.items.loc[20, "tags"] == ("spy",)
    assert d.items.loc[30, "tags"] == ("bond",) and d.items.loc[40, "tags"] == ()
    assert [(s.name, s.kind) for s in d.item_features] == [("genres", "multi"), ("year", "numeric"),
                                                           ("tags", "multi")]


def test_movielens_latest_drops_ratings_of_unlisted_movies(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _latest_fixture(tmp_path / "ml-latest")
    (root / "tags.csv").unlink()
    with open(root / "ratings.csv", "a") as fh:
        fh.write("999,999999,5.0,1493846415")  # an unlisted movie, on the last line, without a newline
    with caplog.at_level(logging.WARNING, logger="training.data"):
        d = load_data(f"movielens:{root}")
    assert d.dropped == {"movieId not in movies.csv": 1} and 999999 not in d.items.index
    assert "999" not in d.users.index and "tags" not in d.items.columns
    assert "ratings.csv: dropped 1 row(s): movieId not in movies.csv (e.g. lines 7)" in caplog.text


@pytest.mark.parametrize("file, text, expected", [
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,10,4.0,964982703\n1,2x,3.5,964981247\n",
     r"ratings\.csv, line 3, column 'movieId': '2x' is not an integer"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,10,4.0,964982703\n\n1,20,,964981247\n",
     r"ratings\.csv, line 4, column 'rating': missing value"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,10,4.0,964982703\n1,20,3.5,964981247,9\n",
     r"ratings\.csv, line 3: unparsable CSV"),
    ("ratings.csv", "user,movieId,rating,timestamp\n1,10,4.0,964982703\n",
     r"ratings\.csv, column 'userId': missing required column"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n", r"ratings\.csv: file has a header but no rows"),
    ("movies.csv", "movieId,title,genres\n10,A (1995),Action\n20,B (1995),Drama\n30,C,Comedy\n10,D,Drama\n",
     r"movies\.csv, line 5, column 'movieId': duplicate movieId 10 \(first on line 2\)"),
    ("tags.csv", "userId,movieId,tag,timestamp\n1,10,bond,1445714994\n1,77,spy,1445714994\n",
     r"tags\.csv, line 3, column 'movieId': movieId 77 is not in movies\.csv"),
])
def test_movielens_latest_errors_name_file_line_and_column(tmp_path: Path, file: str, text: str,
                                                            expected: str) -> None:
    root = _latest_fixture(tmp_path / "ml-latest")
    _write(root / file, text)
    with pytest.raises(DataError, match=expected):
        load_data(f"movielens:{root}")


# ----------------------------------------------------------------------------------------------- CSV/Parquet

INTERACTIONS_CSV = """user_id,item_id,timestamp,weight
007,1,1700000000,1
007,2,2023-11-14T22:13:21Z,2.5
8,2,1700000100,1
8,3,2023-11-15,1
9,1,1700000200,0.5
"""
USERS_CSV = """user_id,country,age
007,FR,31
8,DE,
9,FR,45
"""
ITEMS_CSV = """item_id,brand,tags,price
1,acme,red|blue,9.5
2,zenith,blue,12
3,acme,,3
4,zenith,green|red,20
"""


def _csv_dir(root: Path, inter: str = INTERACTIONS_CSV, users: str | None = USERS_CSV,
             items: str | None = ITEMS_CSV) -> Path:
    root.mkdir(exist_ok=True)
    _write(root / "interactions.csv", inter)
    if users is not None:
        _write(root / "users.csv", users)
    if items is not None:
        _write(root / "items.csv", items)
    return root


def test_csv_happy_path_types_every_feature_kind(tmp_path: Path) -> None:
    d = load_data(f"csv:{_csv_dir(tmp_path / 'shop')}")
    _check_contract(d)
    inter = d.interactions
    assert list(inter["user_id"]) == ["007", "007", "8", "8", "9"]  # "007" stays a string id
    assert inter["item_id"].dtype == np.int64
    # ISO strings become epoch seconds (naive dates are UTC)
    assert list(inter["timestamp"]) == [1700000000, 1700000001, 1700000100, 1700006400, 1700000200]
    assert list(inter["weight"]) == [1.0, 2.5, 1.0, 1.0, 0.5]
    assert list(d.items.index) == [1, 2, 3, 4]  # item 4 has no interactions but is in the catalogue
    assert d.item_features == [FeatureSpec("brand", "categorical"), FeatureSpec("tags", "multi"),
                               FeatureSpec("price", "numeric")]
    assert d.items.loc[1, "tags"] == ("red", "blue") and d.items.loc[3, "tags"] == ()
    assert d.items.loc[2, "tags"] == ("blue",) and d.items.loc[2, "brand"] == "zenith"
    assert d.items["price"].dtype == np.float64
    assert d.user_features == [FeatureSpec("country", "categorical"), FeatureSpec("age", "numeric")]
    assert np.isnan(d.users.loc["8", "age"]) and d.users.loc["007", "country"] == "FR"


def test_parquet_files_give_the_same_data_as_csv(tmp_path: Path) -> None:
    from_csv = load_data(f"csv:{_csv_dir(tmp_path / 'a')}")
    pq = tmp_path / "b"
    pq.mkdir()
    inter = pd.DataFrame({"user_id": ["007", "007", "8", "8", "9"], "item_id": [1, 2, 2, 3, 1],
                          "timestamp": ["1700000000", "2023-11-14T22:13:21Z", "1700000100", "2023-11-15",
                                        "1700000200"],
                          "weight": [1.0, 2.5, 1.0, 1.0, 0.5]})
    inter.to_parquet(pq / "interactions.parquet")
    pd.DataFrame({"user_id": ["007", "8", "9"], "country": ["FR", "DE", "FR"],
                  "age": [31.0, np.nan, 45.0]}).to_parquet(pq / "users.parquet")
    # items as the artifacts write them: indexed by item_id, multi-valued feature as a list column
    items = pd.DataFrame({"brand": ["acme", "zenith", "acme", "zenith"],
                          "tags": [["red", "blue"], ["blue"], [], ["green", "red"]],
                          "price": [9.5, 12.0, 3.0, 20.0]},
                         index=pd.Index([1, 2, 3, 4], name="item_id"))
    items.to_parquet(pq / "items.parquet")
    from_pq = load_data(f"csv:{pq}")
    pd.testing.assert_frame_equal(from_pq.interactions, from_csv.interactions)
    assert from_pq.item_features == from_csv.item_features
    assert from_pq.user_features == from_csv.user_features
    for col in ("brand", "tags", "price"):
        assert list(from_pq.items[col]) == list(from_csv.items[col]) or col == "price"
    assert np.allclose(from_pq.items["price"], from_csv.items["price"])
    assert list(from_pq.users["country"]) == list(from_csv.users["country"])


def test_string_item_ids_and_no_side_tables(tmp_path: Path) -> None:
    root = _csv_dir(tmp_path / "s", inter="user_id,item_id,timestamp\nu1,sku-9,5\nu1,sku-1,6\nu2,sku-9,7\n",
                    users=None, items=None)
    d = load_data(f"csv:{root}")
    _check_contract(d)
    assert d.items.index.dtype == object and list(d.items.index) == ["sku-1", "sku-9"]
    assert list(d.users.index) == ["u1", "u2"] and d.user_features == [] and d.item_features == []
    assert (d.interactions["weight"] == 1.0).all()


def test_dropped_rows_are_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    inter = ("user_id,item_id,timestamp,weight\n1,1,10,1\n1,1,10,3\n1,2,11,0\n2,1,12,-1\n2,2,13,1\n")
    with caplog.at_level(logging.WARNING):
        d = load_data(f"csv:{_csv_dir(tmp_path / 'd', inter=inter, users=None, items=None)}")
    assert d.dropped == {"weight <= 0": 2, "duplicate (user_id, item_id, timestamp)": 1}
    assert len(d.interactions) == 2
    text = caplog.text
    assert "dropped 2 row(s): weight <= 0 (e.g. lines 4, 5)" in text
    assert "dropped 1 row(s): duplicate (user_id, item_id, timestamp) (e.g. lines 3)" in text
    # an item whose only interactions were dropped stays in the catalogue only via a side table
    assert list(d.items.index) == [1, 2]


BAD_CASES = {
    "missing column": (
        {"inter": "user_id,item_id,weight\n1,1,1\n"},
        r"interactions\.csv, column 'timestamp': missing required column"),
    "unparsable line": (
        {"inter": "user_id,item_id,timestamp\n1,1,10\n1,2,11,extra\n"},
        r"interactions\.csv, line 3: unparsable CSV"),
    "bad timestamp": (
        {"inter": "user_id,item_id,timestamp\n1,1,10\n\n1,2,yesterday\n"},
        r"interactions\.csv, line 4, column 'timestamp': 'yesterday' is neither"),
    "bad weight": (
        {"inter": "user_id,item_id,timestamp,weight\n1,1,10,1\n1,2,11,heavy\n"},
        r"interactions\.csv, line 3, column 'weight': 'heavy' is not a finite number"),
    "missing value": (
        {"inter": "user_id,item_id,timestamp\n1,1,10\n1,,11\n"},
        r"interactions\.csv, line 3, column 'item_id': missing value"),
    "short line": (
        {"inter": "user_id,item_id,timestamp\n1,1,10\n1,2\n"},
        r"interactions\.csv, line 3, column 'timestamp': missing value"),
    "empty file": (
        {"inter": ""},
        r"interactions\.csv: file is empty"),
    "header only": (
        {"inter": "user_id,item_id,timestamp\n"},
        r"interactions\.csv: file has a header but no rows"),
    "unknown item": (
        {"inter": "user_id,item_id,timestamp\n007,1,10\n8,77,11\n"},
        r"interactions\.csv, line 3, column 'item_id': item_id 77 is not in items\.csv"),
    "unknown user": (
        {"inter": "user_id,item_id,timestamp\n007,1,10\n7,1,11\n"},
        r"interactions\.csv, line 3, column 'user_id': user_id '7' is not in users\.csv"),
    "duplicate side id": (
        {"items": "item_id,brand\n1,a\n2,b\n1,c\n"},
        r"items\.csv, line 4, column 'item_id': duplicate item_id '1' \(first on line 2\)"),
    "side table first column": (
        {"users": "country,user_id\nFR,007\n"},
        r"users\.csv, line 1, column 'country': the first column must be 'user_id'"),
    "bad side table line": (
        {"users": "user_id,country\n007,FR\n8,DE,extra\n"},
        r"users\.csv, line 3: unparsable CSV"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_data_stops_with_an_error_naming_file_line_and_column(tmp_path: Path, case: str) -> None:
    files, pattern = BAD_CASES[case]
    root = _csv_dir(tmp_path / "bad", inter=files.get("inter", INTERACTIONS_CSV),
                    users=files.get("users", USERS_CSV), items=files.get("items", ITEMS_CSV))
    with pytest.raises(DataError, match=pattern):
        load_data(f"csv:{root}")


def test_parquet_errors_name_the_row(tmp_path: Path) -> None:
    root = tmp_path / "p"
    root.mkdir()
    pd.DataFrame({"user_id": ["a", "b", "c"], "item_id": [1, 2, 3],
                  "timestamp": ["1700000000", "2023-01-01", "soon"]}).to_parquet(root / "interactions.parquet")
    with pytest.raises(DataError, match=r"interactions\.parquet, row 3, column 'timestamp'"):
        load_data(f"csv:{root}")


def test_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown data spec"):
        load_data("kaggle:whatever")
    with pytest.raises(DataError, match="data directory not found"):
        load_data(f"csv:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match=r"interactions\.csv \(or interactions\.parquet\) not found"):
        load_data(f"csv:{tmp_path}")


# ----------------------------------------------------------------------------------------------- split

def test_split_holds_out_each_eligible_users_last_two_interactions() -> None:
    inter = pd.DataFrame({
        # user "a": two rows share the last timestamp -> the later row in the log is the test row
        "user_id": pd.Series(["a", "b", "a", "a", "c", "a", "b", "c", "c", "a"], dtype=object),
        "item_id": np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], dtype=np.int64),
        "timestamp": np.array([1, 5, 2, 3, 1, 9, 6, 3, 2, 9], dtype=np.int64),
        "weight": 1.0,
    })
    s = split_leave_last_out(inter)
    assert dict(zip(s.test["user_id"], s.test["item_id"], strict=True)) == {"a": 10, "c": 8}
    assert dict(zip(s.valid["user_id"], s.valid["item_id"], strict=True)) == {"a": 6, "c": 9}
    assert sorted(s.train["item_id"]) == [1, 2, 3, 4, 5, 7]  # "b" has 2 interactions: train only
    assert list(s.train.columns) == list(inter.columns)


def test_split_properties_on_synthetic_data() -> None:
    d = load_data("synthetic", size="tiny", seed=1)
    # a few users with 1-2 interactions, who must stay in train
    extra = pd.DataFrame({"user_id": pd.Series(["9001", "9002", "9002"], dtype=object),
                          "item_id": np.array([1, 2, 3], dtype=np.int64),
                          "timestamp": np.array([1, 2, 3], dtype=np.int64), "weight": 1.0})
    inter = pd.concat([d.interactions, extra], ignore_index=True)
    s = split_leave_last_out(inter)
    sizes = inter.groupby("user_id").size()
    eligible = set(sizes[sizes >= 3].index)
    assert set(s.test["user_id"]) == eligible == set(s.valid["user_id"])
    assert s.test["user_id"].is_unique and s.valid["user_id"].is_unique
    assert {"9001", "9002"} <= set(s.train["user_id"])
    assert len(s.train) + len(s.valid) + len(s.test) == len(inter)
    last_ts = inter.groupby("user_id")["timestamp"].max()
    assert (s.test.set_index("user_id")["timestamp"] == last_ts.reindex(s.test["user_id"]).to_numpy()).all()
    # no interaction appears twice across the parts, and nothing held out precedes a train row
    key = ["user_id", "item_id", "timestamp"]
    parts = pd.concat([s.train[key], s.valid[key], s.test[key]])
    assert not parts.duplicated().any()
    train_last = s.train.groupby("user_id")["timestamp"].max()
    v = s.valid.set_index("user_id")["timestamp"]
    assert (v >= train_last.reindex(v.index)).all()
    assert (s.test.set_index("user_id")["timestamp"] >= v.reindex(s.test["user_id"]).to_numpy()).all()
