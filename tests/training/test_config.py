"""Training settings: one validation (TrainConfig), flags that only parse and name themselves in
errors, every tower setting reaching the towers, one list of model / sampler / loss names."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from towers import MODELS, MULTI_POOLINGS
from towers.validation import ConfigError
from training.config import LOSS_NAMES, NEGATIVES, TrainConfig
from twotower.cli import build_parser


def _parse(*argv: str) -> TrainConfig:
    from training.cli import train_config

    return train_config(build_parser().parse_args(["train", *argv]))


def test_the_cli_defaults_are_the_config_defaults() -> None:
    assert _parse() == TrainConfig(data_options={"seed": 0})


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "argument --lr: expected a positive number, got -1.0"),
    (["--lr", "inf"], "argument --lr: expected a positive number, got inf"),
    (["--dropout", "1"], "argument --dropout: expected a number in [0, 1), got 1.0"),
    (["--user-id-dropout", "-0.1"], "argument --user-id-dropout: expected a number in [0, 1), got -0.1"),
    (["--batch-size", "1"], "argument --batch-size: expected an integer >= 2, got 1"),
    (["--hidden", "64,0"], "argument --hidden: expected a list of positive integers, got (64, 0)"),
    (["--hidden", "64,x"], "argument --hidden: expected a list of positive integers, got '64,x'"),
    (["--threads", "0"], "argument --threads: expected a positive integer, got 0"),
    (["--popularity-alpha", "-1"], "argument --popularity-alpha: expected a number >= 0, got -1.0"),
    (["--tie-embeddings", "maybe"], "argument --tie-embeddings: expected true or false (on or off), got 'maybe'"),
    (["--multi-pooling", "max"], "argument --multi-pooling: invalid choice: 'max'"),
])
def test_a_bad_flag_exits_2_naming_the_flag(capsys: pytest.CaptureFixture[str], argv: list[str],
                                            message: str) -> None:
    with pytest.raises(SystemExit) as exc:
        _parse(*argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_values_from_python_name_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"dropout must be a number in \[0, 1\), got 1.0"):
        TrainConfig(dropout=1.0)
    with pytest.raises(ConfigError, match="unknown setting 'epoch'"):
        TrainConfig(epoch=3)  # a typo is not silently ignored
    cfg = TrainConfig()
    with pytest.raises(ConfigError, match="epochs must be a positive integer, got 0"):
        cfg.epochs = 0  # assignments are checked too
    assert cfg.epochs == TrainConfig().epochs


def test_a_saved_config_reads_back_equal_and_older_ones_still_load() -> None:
    cfg = TrainConfig(hidden=(32, 16), multi_pooling="sum", emb_dim=8, dim=8)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("multi_pooling", "item_id_embedding")}
    assert TrainConfig.from_dict({**old, "a_setting_since_removed": 1}).multi_pooling == "mean"


def test_emb_dim_follows_dim_unless_given() -> None:
    assert TrainConfig(dim=24).emb_dim == 24
    assert TrainConfig(dim=24, emb_dim=8).emb_dim == 8


def test_hidden_layers_follow_the_model_unless_given() -> None:
    # YoutubeDNN: one linear layer per tower; DSSM: a ReLU layer of 256; a value given always wins
    assert TrainConfig().hidden == () and TrainConfig(model="dssm").hidden == (256,)
    assert TrainConfig(model="dssm", hidden=()).hidden == () and TrainConfig(hidden=(64,)).hidden == (64,)
    ns = build_parser().parse_args(["train", "--hidden", ""])
    assert ns.hidden == ()
    ns = build_parser().parse_args(["train", "--model", "dssm"])
    assert TrainConfig(model=ns.model, hidden=ns.hidden).tower_config().hidden == (256,)
    # and that is what the towers are built from
    assert TrainConfig().tower_config().hidden == ()


def test_interests_follow_the_history_encoder_and_refuse_one_without_heads(capsys) -> None:
    assert TrainConfig().interests == 3 and TrainConfig().tower_config().interests == 3  # attention pooling
    for other in ("mean", "recency", "transformer"):
        assert TrainConfig(history_encoder=other).interests == 1
    assert TrainConfig(use_history=False).interests == 1
    assert _parse("--interests", "1").interests == 1 and _parse("--interests", "4").tower_config().interests == 4
    with pytest.raises(ConfigError, match="interests must be 1 unless history_encoder is 'attention'.*'mean'"):
        TrainConfig(history_encoder="mean", interests=2)
    with pytest.raises(ConfigError) as exc:
        TrainConfig(use_history=False, interests=3)
    assert exc.value.field == "interests"


def test_every_tower_setting_reaches_the_towers() -> None:
    """tower_config() once dropped multi_pooling and item_id_embedding: training could not set them."""
    from towers.model import TowerConfig

    tower_fields = {f.name for f in dataclasses.fields(TowerConfig)} - {"extra"}
    assert tower_fields <= set(TrainConfig.model_fields), tower_fields - set(TrainConfig.model_fields)
    cfg = _parse("--model", "dssm", "--multi-pooling", "sum", "--item-id-embedding", "off", "--history", "off",
                 "--dim", "24", "--emb-dim", "12", "--hidden", "48,24", "--dropout", "0.25",
                 "--history-len", "7", "--user-id", "off", "--history-encoder", "transformer",
                 "--recency-half-life", "3", "--attention-heads", "3", "--attention-layers", "2")
    tc = cfg.tower_config()
    assert (tc.multi_pooling, tc.item_id_embedding, tc.use_history) == ("sum", False, False)
    assert (tc.model, tc.dim, tc.emb_dim, tc.hidden, tc.dropout) == ("dssm", 24, 12, (48, 24), 0.25)
    for name in tower_fields:
        assert getattr(tc, name) == getattr(cfg, name), name


def test_every_listed_name_is_one_the_jobs_accept() -> None:
    """Model, sampler and loss names are listed once; each must build."""
    import torch

    from tests.factories import make_world
    from towers.checkpoint import TwoTowerModel
    from towers.features import FeatureEncoder
    from training.losses import retrieval_loss
    from training.samplers import make_sampler

    counts = np.arange(1, 21, dtype=np.float64)
    for name in NEGATIVES:
        assert make_sampler(name, 20, counts, num_negatives=4, hard_negatives=2).name == name
    u, v = torch.nn.functional.normalize(torch.randn(4, 8), dim=1), torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    for loss in LOSS_NAMES:
        assert torch.isfinite(retrieval_loss(u, v, torch.arange(1, 5), loss=loss))
    world = make_world(n_users=5, n_items=10, per_user=3)
    enc = FeatureEncoder.fit(world.users, world.items, world.user_features, world.item_features, history_len=4)
    for model in MODELS:
        for pooling in MULTI_POOLINGS:
            cfg = TrainConfig(model=model, multi_pooling=pooling, dim=8, hidden=(16,))
            vecs = TwoTowerModel.create(cfg.tower_config(), enc).embed_items(world.items)
            assert vecs.shape == (10, 8) and np.isfinite(vecs).all()
