"""The serving forward of the user tower (NumPy lookups and pooling) against the module itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.factories import make_world
from towers.checkpoint import TwoTowerModel
from towers.features import FeatureEncoder
from towers.inference import UserTowerNumpy
from towers.model import TowerConfig
from towers.schema import FeatureSpec


@pytest.fixture(scope="module")
def world():
    w = make_world(n_users=12, n_items=30, per_user=5)
    langs = [("en",), ("en", "de"), (), ("fr", "de", "it")] * 3
    w.users = w.users.assign(langs=langs[: len(w.users)])
    w.user_features = [*w.user_features, FeatureSpec("langs", "multi")]
    return w


def _model(world, **kw) -> TwoTowerModel:
    torch.manual_seed(0)
    enc = FeatureEncoder.fit(world.users, world.items, world.user_features, world.item_features, history_len=6)
    return TwoTowerModel.create(TowerConfig(dim=8, emb_dim=8, feature_dim=4, **kw), enc)


def _requests(world):
    users = ["1", "2", "3", "nobody", None, "4", "5"]
    feats = [None, {"age": 30.0}, {"country": "zz-unknown", "langs": ("de",)}, {"langs": ()}, None,
             {"age": None, "langs": ("en", "xx")}, None]
    items = list(world.items.index)
    hists = [items[:2], [], items[3:15], [items[0], 10_000_000], [items[4]], items[:1] * 9, []]
    return users, feats, hists


@pytest.mark.parametrize("kw", [
    dict(model="youtubednn", hidden=(16,)),
    dict(model="dssm", hidden=(16, 8), use_history=True, multi_pooling="sum"),
    dict(model="youtubednn", hidden=(16,), dropout=0.3, use_user_id=False),
    dict(model="dssm", hidden=(), use_user_features=False),
    dict(model="youtubednn", hidden=(16,), history_encoder="recency", recency_half_life=1.5),
    dict(model="youtubednn", hidden=(16,), history_encoder="attention", use_user_id=False),
    dict(model="youtubednn", hidden=(16,), history_encoder="attention", interests=3),
    dict(model="dssm", hidden=(), history_encoder="attention", interests=2, use_user_features=False),
])
def test_numpy_forward_matches_the_module(world, kw) -> None:
    m = _model(world, **kw)
    users, feats, hists = _requests(world)
    batch = m.encoder.encode_users(users, feats, hists)
    ut = m.user_tower.eval()
    with torch.no_grad():
        want = ut(batch).numpy()
    got = UserTowerNumpy.from_module(ut)(batch)
    np.testing.assert_allclose(got, want, atol=1e-6)
    k = kw.get("interests", 1)
    assert got.dtype == np.float32 and got.shape == ((len(users), 8) if k == 1 else (len(users), k, 8))
    # and what embed_users (which serving calls) returns, one user at a time or all together
    np.testing.assert_allclose(m.embed_users(users, feats, hists), want, atol=1e-6)
    one = np.vstack([m.embed_users([u], [f], [h]) for u, f, h in zip(users, feats, hists, strict=True)])
    np.testing.assert_allclose(one, want, atol=1e-6)


def test_the_numpy_forward_follows_training_updates_and_replaced_weights(world) -> None:
    m = _model(world, model="youtubednn", hidden=(16,))
    users, feats, hists = _requests(world)
    before = m.embed_users(users, feats, hists)
    ut = m.user_tower
    opt = torch.optim.SGD(ut.parameters(), lr=0.5)
    ut.train()
    loss = ut(m.encoder.encode_users(users, feats, hists)).sum()
    loss.backward()
    opt.step()  # in place: the NumPy views see it
    after = m.embed_users(users, feats, hists)
    assert not np.allclose(after, before, atol=1e-4)
    with torch.no_grad():
        np.testing.assert_allclose(after, ut.eval()(m.encoder.encode_users(users, feats, hists)).numpy(), atol=1e-6)
    # a parameter replaced by a new tensor (new storage): the twin is rebuilt, not read stale
    with torch.no_grad():
        ut.hist_emb.weight = torch.nn.Parameter(ut.hist_emb.weight * 2)
        want = ut(m.encoder.encode_users(users, feats, hists)).numpy()
    np.testing.assert_allclose(m.embed_users(users, feats, hists), want, atol=1e-6)


def test_a_bag_of_only_padding_pools_to_zeros() -> None:
    from towers.inference import _bag

    table = np.arange(12, dtype=np.float32).reshape(4, 3) + 1  # row 0 is NOT zero: it must still be left out
    idx = np.array([[0, 0], [2, 0], [1, 3]])
    np.testing.assert_allclose(_bag(table, idx, mean=True), [[0, 0, 0], table[2], (table[1] + table[3]) / 2])
    np.testing.assert_allclose(_bag(table, idx, mean=False), [[0, 0, 0], table[2], table[1] + table[3]])


@pytest.mark.parametrize("kw", [
    dict(model="youtubednn", hidden=(16,)),
    dict(model="dssm", hidden=(16, 8), use_history=True, multi_pooling="sum", use_user_id=False),
    dict(model="youtubednn", hidden=(16,), history_encoder="recency"),
    dict(model="youtubednn", hidden=(16,), history_encoder="attention"),
    dict(model="youtubednn", hidden=(16,), history_encoder="attention", interests=3),
])
def test_the_exported_user_tower_embeds_as_the_model_does(world, kw, tmp_path) -> None:
    """The file the reindex job writes into a bundle (user_tower.npz) rebuilds the user side with
    NumPy alone: same vectors as the trained model for known, unknown and anonymous users."""
    from towers.inference import UserEmbedder

    m = _model(world, **kw)
    users, feats, hists = _requests(world)
    m.user_embedder().save(tmp_path / "user_tower.npz")
    back = UserEmbedder.load(tmp_path / "user_tower.npz")
    assert back.dim == m.dim and back.encoder.user_ids == m.encoder.user_ids
    assert back.interests == kw.get("interests", 1)
    np.testing.assert_allclose(back.embed_users(users, feats, hists), m.embed_users(users, feats, hists), atol=1e-6)


def test_a_broken_or_pickled_export_is_refused_naming_the_file(world, tmp_path) -> None:
    from towers.inference import UserEmbedder

    m = _model(world, model="youtubednn", hidden=(16,))
    path = tmp_path / "user_tower.npz"
    m.user_embedder().save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="user_tower.npz: not a loadable user tower export"):
        UserEmbedder.load(path)
    # an object array would be unpickled by a careless reader: allow_pickle=False refuses it
    np.savez(path, __meta__=np.frombuffer(b"{}", dtype=np.uint8), user=np.array([object()], dtype=object))
    with pytest.raises(ValueError, match="user_tower.npz"):
        UserEmbedder.load(path)


def test_the_self_attention_encoder_is_served_by_the_module(world) -> None:
    """No NumPy twin for the transformer encoder: embed_users falls back to the module's forward
    (decided once), with the same answers one user at a time or together; the bundle then carries
    no user_tower.npz and the service reads model.pt (index.bundle)."""
    m = _model(world, model="youtubednn", hidden=(16,), history_encoder="transformer")
    with pytest.raises(ValueError, match="no NumPy twin for history encoder TransformerHistory"):
        UserTowerNumpy.from_module(m.user_tower)
    users, feats, hists = _requests(world)
    ut = m.user_tower.eval()
    with torch.no_grad():
        want = ut(m.encoder.encode_users(users, feats, hists)).numpy()
    np.testing.assert_allclose(m.embed_users(users, feats, hists), want, atol=1e-5)
    assert m._numpy_user_tower() is None and m._no_twin is m.user_tower
    one = np.vstack([m.embed_users([u], [f], [h]) for u, f, h in zip(users, feats, hists, strict=True)])
    np.testing.assert_allclose(one, want, atol=1e-5)
