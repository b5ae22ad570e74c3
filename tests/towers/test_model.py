"""Tower modules: output shapes, unit norm, separate state dicts, pooling, cold items."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from tests.factories import make_world
from towers.checkpoint import TwoTowerModel
from towers.features import FeatureEncoder
from towers.model import ItemTower, TowerConfig, UserTower, masked_mean


@pytest.fixture()
def world():
    return make_world(n_users=10, n_items=25, per_user=5)


def _model(world, model: str, **kw) -> TwoTowerModel:
    torch.manual_seed(0)
    enc = FeatureEncoder.fit(world.users, world.items, world.user_features, world.item_features, history_len=6)
    return TwoTowerModel.create(TowerConfig(model=model, dim=8, emb_dim=8, feature_dim=4, hidden=(16,), **kw), enc)


@pytest.mark.parametrize("model", ["youtubednn", "dssm"])
def test_towers_return_unit_vectors_of_the_configured_dimension(world, model: str) -> None:
    m = _model(world, model)
    items = m.embed_items(world.items)
    assert items.shape == (len(world.items), 8)
    assert torch.allclose(torch.from_numpy(items).norm(dim=1), torch.ones(len(items)), atol=1e-5)
    users = m.embed_users(["1", "2", "nobody"], world.users.reindex(["1", "2", "nobody"]), [[1, 2], [], [3]])
    assert users.shape == (3, 8)
    assert torch.allclose(torch.from_numpy(users).norm(dim=1), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("model", ["youtubednn", "dssm"])
def test_user_and_item_towers_have_separate_state_dicts(world, model: str) -> None:
    m = _model(world, model)
    meta = m.encoder.meta()
    u_keys = set(m.user_tower.state_dict())
    i_keys = set(m.item_tower.state_dict())
    # a fresh UserTower loads the user state dict alone: serving never needs the item side
    fresh = UserTower(m.config, meta)
    fresh.load_state_dict(m.user_tower.state_dict())
    ItemTower(m.config, meta).load_state_dict(m.item_tower.state_dict())
    assert u_keys and i_keys
    assert not any(k.startswith("item") for k in u_keys)


def test_history_pooling_ignores_padding_and_order(world) -> None:
    m = _model(world, "youtubednn")
    enc = m.encoder
    ut = m.user_tower.eval()
    a = enc.encode_users(["1"], None, [[3, 5]])
    b = enc.encode_users(["1"], None, [[5, 3]])
    with torch.no_grad():
        assert torch.allclose(ut(a), ut(b), atol=1e-6)  # mean pooling: order-free
        # the pooled vector is exactly the mean of the two item embeddings
        rows = a["hist"]
        emb = ut.hist_emb.weight
        pooled = masked_mean(emb[rows], rows)
        r3, r5 = enc.item_row(3), enc.item_row(5)
        torch.testing.assert_close(pooled[0], (emb[r3] + emb[r5]) / 2)
        c = enc.encode_users(["1"], None, [[3, 5, 7]])
        assert not torch.allclose(ut(a), ut(c))  # another item does move the user


def test_a_cold_item_gets_a_content_vector(world) -> None:
    """YoutubeDNN with item features: an id never seen in training (row 0) still gets a vector from
    its content, and different content gives a different vector."""
    m = _model(world, "youtubednn")
    new = pd.DataFrame({"genre": ["action", "drama"], "tags": [("action",), ("drama", "horror")],
                        "year": [1999.0, 2015.0]}, index=pd.Index([9001, 9002], name="item_id"))
    vecs = torch.from_numpy(m.embed_items(new))
    assert m.encoder.item_rows([9001, 9002]).tolist() == [0, 0]
    assert torch.allclose(vecs.norm(dim=1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(vecs[0], vecs[1])


def test_youtubednn_without_item_features_has_nothing_for_a_cold_item(world) -> None:
    m = _model(world, "youtubednn", use_item_features=False)
    new = world.items.iloc[[0]].copy()
    new.index = pd.Index([424242], name="item_id")
    vec = m.embed_items(new)
    assert float(abs(vec).sum()) == 0.0  # a zero vector: it never matches anything


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="model must be"):
        TowerConfig(model="transformer")
    with pytest.raises(ValueError, match="temperature"):
        TowerConfig(temperature=0.0)
    with pytest.raises(ValueError, match="multi_pooling"):
        TowerConfig(multi_pooling="max")
    cfg = TowerConfig(hidden=[32, 16])  # type: ignore[arg-type]
    assert TowerConfig.from_dict(cfg.to_dict()) == cfg


def test_sum_pooling_differs_from_mean(world) -> None:
    enc = FeatureEncoder.fit(world.users, world.items, world.user_features, world.item_features)
    outs = []
    for pooling in ("mean", "sum"):
        torch.manual_seed(0)
        it = ItemTower(TowerConfig(model="dssm", dim=8, emb_dim=8, feature_dim=4, hidden=(), multi_pooling=pooling,
                                   item_id_embedding=False), enc.meta())
        items = world.items.iloc[:4].copy()
        items["tags"] = [("action", "comedy")] * 4
        with torch.no_grad():
            outs.append(it(enc.encode_items(items)))
    assert not torch.allclose(outs[0], outs[1])
    assert F.normalize(outs[0], dim=-1).shape == (4, 8)
