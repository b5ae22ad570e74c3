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
    with pytest.raises(ValueError, match="interests"):
        TowerConfig(history_encoder="mean", interests=2)  # only attention pooling has several heads
    with pytest.raises(ValueError, match="interests"):
        TowerConfig(history_encoder="attention", interests=0)
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


# ------------------------------------------------------------------------------------------------ history encoders

ENCODERS = ["mean", "recency", "attention", "transformer"]


def _encoder(name: str, max_len: int = 6) -> tuple[torch.nn.Module, torch.Tensor]:
    from towers.model import history_encoder

    torch.manual_seed(0)
    enc = history_encoder(TowerConfig(emb_dim=8, history_encoder=name, history_len=max_len)).eval()
    table = torch.randn(20, 8)
    table[0] = 0.0  # the padding row
    return enc, table


@pytest.mark.parametrize("name", ENCODERS)
def test_history_encoders_shapes_padding_and_empty_histories(name: str) -> None:
    enc, table = _encoder(name)
    rows = torch.tensor([[3, 5, 7, 0, 0, 0], [4, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        out = enc(table, rows)
        assert out.shape == (3, 8) and torch.isfinite(out).all()
        assert torch.equal(out[2], torch.zeros(8))  # an empty history contributes nothing
        # more padding on the right (a longer --history-len) changes nothing
        wider = torch.cat([rows, torch.zeros(3, 4, dtype=torch.long)], dim=1)
        torch.testing.assert_close(enc(table, wider), out)
        # a row's result does not depend on the other rows of the batch
        torch.testing.assert_close(enc(table, rows[1:2]), out[1:2])
        # another item does move the pooled vector
        assert not torch.allclose(enc(table, torch.tensor([[3, 5, 9, 0, 0, 0]])), out[:1])


@pytest.mark.parametrize("interests", [1, 3])
def test_attention_pooling_is_the_tanh_scorer_in_values_and_gradients(interests: int) -> None:
    """The encoder computes its scores through a sigmoid (towers/model.py says why); what it pools,
    and every parameter's gradient, must be those of the textbook scorer score(tanh(proj(e + age)))."""
    from towers.model import AttentionHistory, history_ages

    torch.manual_seed(1)
    enc = AttentionHistory(8, 6, interests)
    table = torch.randn(20, 8, requires_grad=True)
    rows = torch.tensor([[3, 5, 7, 9, 0, 0], [4, 4, 11, 2, 8, 13], [6, 0, 0, 0, 0, 0]])

    def textbook() -> torch.Tensor:
        e = table[rows]  # (B, L, E)
        h = torch.tanh(enc.proj(e + enc.age(history_ages(rows))))
        logits = enc.score(h).masked_fill((rows == 0).unsqueeze(-1), float("-inf"))
        a = torch.softmax(logits, dim=1)  # (B, L, K)
        out = torch.einsum("blk,ble->bke", a, e)
        return out if interests > 1 else out.squeeze(1)

    params = [table, enc.proj.weight, enc.proj.bias, enc.age.weight, enc.score.weight]
    got, want = enc(table, rows), textbook()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    probe = torch.randn_like(want)
    g_got = torch.autograd.grad((got * probe).sum(), params)
    g_want = torch.autograd.grad((want * probe).sum(), params)
    for name, a, b in zip(["table", "proj.weight", "proj.bias", "age", "score"], g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("name", ["recency", "attention", "transformer"])
def test_order_aware_encoders_read_the_order(name: str) -> None:
    enc, table = _encoder(name)
    with torch.no_grad():
        a = enc(table, torch.tensor([[3, 5, 7, 0]]))
        b = enc(table, torch.tensor([[7, 5, 3, 0]]))
    assert not torch.allclose(a, b)


def test_recency_weights_halve_every_half_life_and_favour_the_latest() -> None:
    from towers.model import RecencyHistory

    enc = RecencyHistory(half_life=2.0)
    w = enc.weights(torch.tensor([[3, 5, 7, 9, 11, 0]]))[0].detach()
    assert w[5] == 0 and abs(float(w.sum()) - 1.0) < 1e-6
    torch.testing.assert_close(w[2] / w[4], torch.tensor(0.5))  # two items older: half the weight
    assert (w[:4] < w[1:5]).all()


@pytest.mark.parametrize("name", ENCODERS)
def test_encoders_train_through_a_sparse_table(name: str) -> None:
    """With the id table's sparse flag the table's gradient is row-sparse and touches only the
    rows the batch read; the encoder's own parameters (if any) get dense gradients."""
    enc, table = _encoder(name)
    enc.train()
    weight = torch.nn.Parameter(table.clone())
    out = enc(weight, torch.tensor([[3, 5, 0, 0], [5, 0, 0, 0]]), True)
    out.pow(2).sum().backward()
    assert weight.grad is not None and weight.grad.is_sparse
    assert set(weight.grad.coalesce().indices()[0].tolist()) <= {0, 3, 5}
    for p in enc.parameters():
        assert p.grad is not None and not p.grad.is_sparse


def test_multi_interest_attention_pools_one_vector_per_interest() -> None:
    """K interests are K softmaxes over the same history: each a convex mix of its items, each
    free to weigh them differently; an empty history pools to zeros in every interest, and the
    user tower returns K unit vectors per user."""
    from towers.model import AttentionHistory

    torch.manual_seed(0)
    enc = AttentionHistory(8, 6, interests=3).eval()
    table = torch.randn(20, 8)
    table[0] = 0.0
    rows = torch.tensor([[3, 5, 7, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        out = enc(table, rows)
    assert out.shape == (2, 3, 8)
    assert torch.equal(out[1], torch.zeros(3, 8))
    assert not torch.allclose(out[0, 0], out[0, 1]) and not torch.allclose(out[0, 1], out[0, 2])
    # each interest lies in the span of the history's rows: a mix with weights summing to 1
    hist = table[[3, 5, 7]]  # (3, 8)
    w = torch.linalg.lstsq(hist.T, out[0].T).solution  # (3 items, 3 interests)
    torch.testing.assert_close(hist.T @ w, out[0].T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.sum(0), torch.ones(3), atol=1e-5, rtol=1e-5)
    assert (w > -1e-5).all()

    from tests.factories import make_world
    from towers.features import FeatureEncoder
    from towers.model import UserTower

    world = make_world(n_users=6, n_items=20, per_user=4)
    fe = FeatureEncoder.fit(world.users, world.items, world.user_features, world.item_features, history_len=6)
    tower = UserTower(TowerConfig(dim=8, emb_dim=8, feature_dim=4, hidden=(), history_encoder="attention",
                                  interests=3), fe.meta()).eval()
    with torch.no_grad():
        u = tower(fe.encode_users(["1", "2"], None, [list(world.items.index[:3]), []]))
    assert u.shape == (2, 3, 8)
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(2, 3))


def test_checkpoints_from_before_history_encoders_pool_by_the_mean() -> None:
    old = TowerConfig().to_dict()
    del old["history_encoder"]
    assert TowerConfig.from_dict(old).history_encoder == "mean"
    with pytest.raises(ValueError, match="history_encoder"):
        TowerConfig(history_encoder="lstm")
