"""The training job: ``run(TrainConfig(...)) -> TrainResult``, in stages a reader can follow.

    run(cfg)
      start_run        the version directory: a new one, or the interrupted one ``--resume`` names
      prepare_data     load, split leave-last-out, fit the encoder, this rank's examples
      build_model      towers (tied tables), optimisers, sampler, encoded side tables
      TrainState       fresh, or restored from ``last.pt`` (the one dataclass that saves and restores)
      train_epoch      one pass over this rank's batches
      end_epoch        validate, keep the best epoch as ``model.pt``, save ``last.pt``
      finish           test the best epoch, write metrics and curves, publish ``models/LATEST``

Examples are next-item predictions (training/pipeline.py): the user tower reads the items the user
had before the label, the user's features and the user id (dropped to the out-of-vocabulary row
with ``user_id_dropout`` so a new user served with an inline history still gets a trained path).
Data order, negatives and dropout are functions of (seed, epoch, rank), so a resumed run replays
exactly the batches of an uninterrupted one.

Under ``torchrun`` every rank runs this same function (training/distributed.py): each trains on its
own users' examples, the positives' rows of every rank are gathered so the negatives are the
global batch, and rank 0 alone writes files and shows progress. Nothing points at the version
(``models/LATEST``) until it is complete.
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from towers.artifacts import (
    LATEST,
    MODELS_DIR,
    atomic_open,
    atomic_write,
    atomic_write_json,
    model_dir,
    new_version,
    versions,
    write_pointer,
)
from towers.neighbours import set_weight as set_neighbour_weight
from towers.schema import DataError
from training.config import _RUNTIME_FIELDS, TrainConfig
from training.defaults import DataStats, derive
from training.distributed import Dist, RankLostError, is_collective_failure
from training.memory import peak_rss_mb, release_freed_memory, reuse_freed_blocks
from training.pipeline import MemoryBatches, build_examples, epoch_seed, loader, part_of

log = logging.getLogger(__name__)

# /2: optimiser state split into the dense AdamW and the id tables' optimiser
STATE_FORMAT = "twotower-train-state/2"


@dataclass
class TrainResult:
    model_version: str
    dir: Path
    metrics: dict[str, Any]
    # the test evaluation per user ({"masked"/"raw": {metric: (U,) array}}, the users in the evaluation
    # set's order): for comparing two runs on the same data user by user (twotower tune); not saved
    test_per_user: dict[str, Any] | None = None

    @property
    def model_path(self) -> Path:
        return self.dir / "model.pt"


# ------------------------------------------------------------------------------------------------
# artifacts helpers


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj)


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        df.to_parquet(f)


def write_data_snapshot(data: Any, dest: Path) -> None:
    """The catalogue, user table and FULL interaction log the model was trained from (the reindex
    job reads them: its histories, seen sets and popularity must cover everything a user did)."""
    dest.mkdir(parents=True, exist_ok=True)
    items = data.items.copy()
    items.index.name = "item_id"
    users = data.users.copy()
    users.index = pd.Index([str(u) for u in users.index], dtype=object, name="user_id")
    for table in (items, users):
        for col in table.columns:
            if table[col].map(lambda v: isinstance(v, tuple)).any():
                table[col] = table[col].map(list)  # Parquet list column; read back as a multi feature
    _write_parquet(items, dest / "items.parquet")
    _write_parquet(users, dest / "users.parquet")
    _write_parquet(data.interactions.reset_index(drop=True), dest / "interactions.parquet")


def update_latest(models_dir: Path, version: str) -> None:
    """Publish a complete version: models/LATEST names it (durably, like bundles/CURRENT)."""
    write_pointer(models_dir / LATEST, version)


def resolve_resume_dir(artifacts: str | Path, which: str) -> Path:
    """``latest``: the newest version directory that has a ``last.pt`` (an interrupted run is not in
    models/LATEST, which only names complete versions); otherwise the named version."""
    models = Path(artifacts) / MODELS_DIR
    if which == "latest":
        cands = versions(models, containing="last.pt")  # oldest first: version names sort by time
        if not cands:
            raise DataError("--resume latest: no model version with a last.pt to resume", path=models)
        return models / cands[-1]
    # a version is one directory under models/: "..", "../x" or an absolute path would resume (and
    # then write into) a directory outside the artifacts root
    mdir = model_dir(artifacts, which, source=models)
    if not (mdir / "last.pt").is_file():
        raise DataError(f"--resume {which}: no resumable run (last.pt missing)", path=mdir)
    return mdir


def _pick_device(name: str) -> Any:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) CPU ticks of the whole machine so far, from /proc/stat; None where it is missing.
    Busy is everything but idle and iowait; stolen time counts as busy (a core the hypervisor took
    is not ours to use)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]  # user .. steal (guest is inside user)
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    return sum(fields) - fields[3] - fields[4], sum(fields)


def busy_elsewhere(busy: int, total: int, own_cpu_s: float, window_s: float, cores: int) -> float:
    """Cores other processes kept busy over a window: the machine's busy share of ``total`` ticks,
    in cores, less this process's own CPU seconds in the window."""
    if total <= 0 or window_s <= 0:
        return 0.0
    return max(0.0, busy / total * cores - own_cpu_s / window_s)


def idle_cores(window_s: float = 0.25) -> int:
    """CPU threads worth using now: the cores other processes are not using, at least 1.

    Intra-op threads that share an oversubscribed core spin-wait on each other: on a 2-core machine
    with two other busy processes, 2 threads ran a training step 7x slower than 1 thread. Results do
    not depend on the thread count (checked bit for bit for this model), only the speed does.

    Measured over ``window_s`` from /proc/stat, less this process's own use. The 1-minute load
    average (the fallback where /proc/stat is missing) also counts this process's own recent work:
    a run started right after another in the same process (``twotower tune``'s trials, the quality
    benchmark's rows) got 1 thread of 2 for nothing.
    """
    cores = max(1, os.cpu_count() or 1)
    before, own0 = _cpu_ticks(), os.times()
    if before is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # not available on this platform
            return cores
        return int(min(cores, max(1, round(cores - load))))
    time.sleep(window_s)
    after, own1 = _cpu_ticks(), os.times()
    assert after is not None
    own = (own1.user + own1.system) - (own0.user + own0.system)
    others = busy_elsewhere(after[0] - before[0], after[1] - before[1], own, own1.elapsed - own0.elapsed, cores)
    return int(min(cores, max(1, round(cores - others))))


# ------------------------------------------------------------------------------------------------
# stage 1: the version directory


@dataclass
class RunDir:
    cfg: TrainConfig        # on --resume: the interrupted run's settings, runtime fields from the new call
    version: str
    dir: Path
    resuming: bool


def start_run(cfg: TrainConfig, dist: Dist) -> RunDir:
    """A new version directory (rank 0 names it, every rank uses it), or the one to resume."""
    if cfg.resume:
        mdir = resolve_resume_dir(cfg.artifacts, cfg.resume)
        saved = json.loads((mdir / "config.json").read_text())["train"]
        runtime = {k: getattr(cfg, k) for k in _RUNTIME_FIELDS}
        dist.barrier()  # every rank has read the directory before rank 0 tidies it
        if dist.is_main:
            for marker in mdir.glob("paused-*"):  # left by a run stopped with the pause_at hook
                marker.unlink(missing_ok=True)
        return RunDir(TrainConfig.from_dict({**saved, **runtime}), mdir.name, mdir, True)
    version = dist.broadcast(new_version())
    run = RunDir(cfg, version, model_dir(cfg.artifacts, version), False)
    if dist.is_main:
        run.dir.mkdir(parents=True, exist_ok=False)
    dist.barrier()
    return run


# ------------------------------------------------------------------------------------------------
# stage 2: data


@dataclass
class Prepared:
    """The data side of a run, whatever its source."""

    data: Any                   # RecData: everything (in memory) or the evaluation sample (streamed)
    split: Any                  # its Split
    encoder: Any                # towers.features.FeatureEncoder (every user and item of the data)
    batches: Any                # this rank's training.pipeline.EpochBatches
    steps: int                  # batches per epoch, the same on every rank
    counts: np.ndarray          # (N_items,) label counts over ALL ranks' examples (logQ, popularity)
    history: tuple[np.ndarray, np.ndarray] | None  # (user rows, item rows) of this rank's examples,
    #                             when the sampler masks the users' histories
    weighted: bool              # some interaction weight is not 1
    user_table: dict[str, Any]  # every user's side features, encoded by user row (CPU tensors)
    item_table: dict[str, Any]  # every item's features, encoded by item row
    eval_valid: Any             # training.evaluate.EvalSet | None (rank 0)
    stats: dict[str, Any]       # sizes for config.json
    stream_dir: Path | None = None  # streamed: the shard files (removed when the run is complete)
    neighbours: Any = None      # towers.neighbours.Neighbours of the training split (rank 0, when validation needs it)
    # the settings with the ones left unset derived from this data (training/defaults.py), and
    # {setting: {value, why}} for those; run() carries on with ``cfg``
    cfg: Any = None
    derived: dict[str, Any] = field(default_factory=dict)


def prepare_data(cfg: TrainConfig, dist: Dist, run: RunDir) -> Prepared:
    """Data held in memory, or streamed from part files when the source is laid out for it."""
    from training.stream import stream_source

    kind, _, arg = cfg.data.strip().partition(":")
    src = stream_source(arg, force=cfg.stream) if kind.lower() == "csv" and arg else None
    if src is None:
        if cfg.stream:
            raise DataError(f"--stream reads csv:DIR data, not {cfg.data!r}")
        return prepare_memory(cfg, dist, run)
    return prepare_stream(cfg, dist, run, src)


def _needs_history(cfg: TrainConfig) -> bool:
    return (cfg.mask_history_hits or cfg.negatives == "hard") and cfg.negatives != "none"


def _steps_and_batch(cfg: TrainConfig, dist: Dist, n_local: int) -> tuple[int, int]:
    local_batch = max(1, math.ceil(cfg.batch_size / dist.world))
    return dist.max_int(math.ceil(n_local / local_batch)), local_batch


def prepare_memory(cfg: TrainConfig, dist: Dist, run: RunDir) -> Prepared:
    from towers.features import FeatureEncoder
    from training.data import load_data, split_leave_last_out
    from training.evaluate import build_eval_set

    data = load_data(cfg.data, **cfg.data_options)
    split = split_leave_last_out(data)
    if len(split.train) == 0:
        raise DataError(f"data {cfg.data!r}: the training split is empty")
    # settings left unset are derived from the data (a resumed run's were resolved when it started)
    cfg, derived = derive(cfg, DataStats.of(split.train["user_id"].to_numpy(), len(data.items), len(data.interactions)))
    assert cfg.history_len is not None
    encoder = FeatureEncoder.fit(data.users, data.items, data.user_features, data.item_features,
                                 history_len=cfg.history_len)
    ex = build_examples(split.train, pd.Index(encoder.user_ids), pd.Index(encoder.item_ids), cfg.history_len)
    if len(ex) == 0:
        raise DataError(f"data {cfg.data!r}: no usable training interactions")
    counts = np.bincount(ex.item_rows, minlength=len(encoder.item_ids) + 1)[1:].astype(np.float64)
    rows = np.flatnonzero(part_of(ex.user_rows, dist.world) == dist.rank)  # this rank's users
    steps, local_batch = _steps_and_batch(cfg, dist, len(rows))
    batches = MemoryBatches(ex, rows, batch=local_batch, seed=cfg.seed, rank=dist.rank, full_batches=dist.active)
    ev_valid = build_eval_set(data, split, "valid") if len(split.valid) and dist.is_main else None
    if dist.is_main and not run.resuming:
        write_data_snapshot(data, run.dir / "data")
    stats = {"name": data.name, "users": len(data.users), "items": len(data.items),
             "interactions": len(data.interactions), "train_rows": len(split.train), "valid_rows": len(split.valid),
             "test_rows": len(split.test), "examples": len(ex)}
    history = (ex.user_rows[rows], ex.item_rows[rows]) if _needs_history(cfg) else None
    return Prepared(data, split, encoder, batches, steps, counts, history, bool((ex.weights != 1.0).any()),
                    encoder.encode_user_table(data.users), encoder.encode_item_table(data.items), ev_valid, stats,
                    cfg=cfg, derived=derived)


def prepare_stream(cfg: TrainConfig, dist: Dist, run: RunDir, src: Any) -> Prepared:
    """Part files read in chunks (training/stream.py): rank 0 partitions them by user into shards
    once; every rank then reads only its own shards, one at a time."""
    import torch

    from towers.features import FeatureEncoder
    from towers.schema import FeatureSpec
    from training.evaluate import build_eval_set
    from training.stream import (
        Partitioned,
        ShardBatches,
        ShardReader,
        eval_sample,
        partition,
        sample_recdata,
        shard_count,
        side_tables,
        stream_stats,
        write_stream_snapshot,
    )

    sdir, ddir = run.dir / "stream", run.dir / "data"
    if dist.is_main:
        usable = (sdir / "meta.json").is_file() and Partitioned.load(sdir).shards % dist.world == 0
        if not usable:
            from training.stream import count_rows

            shards = shard_count(count_rows(src), cfg.shard_rows, dist.world)
            log.info("partitioning %s into %d shards of its users", src.directory, shards)
            part, user_ids, item_texts = partition(src, sdir, shards)
            users, uspecs, items, ispecs, as_int = side_tables(src, user_ids, item_texts, part.item_id_is_int)
            part.item_id_is_int = as_int
            part.specs = {"user": [f.to_dict() for f in uspecs], "item": [f.to_dict() for f in ispecs]}
            part.save()
            if not run.resuming:
                write_stream_snapshot(part, users, items, ddir)
            del users, items, user_ids, item_texts
            release_freed_memory()
    dist.barrier()
    part = Partitioned.load(sdir)
    users = pd.read_parquet(ddir / "users.parquet")
    items = pd.read_parquet(ddir / "items.parquet")
    users.index = pd.Index(users.index.astype(str).to_numpy(dtype=object), dtype=object, name="user_id")
    uspecs = [FeatureSpec.from_dict(f) for f in part.specs["user"]]
    ispecs = [FeatureSpec.from_dict(f) for f in part.specs["item"]]
    cfg, derived = derive(cfg, lambda: stream_stats(part, len(items)))
    assert cfg.history_len is not None
    encoder = FeatureEncoder.fit(users, items, uspecs, ispecs, history_len=cfg.history_len)
    user_table, item_table = encoder.encode_user_table(users), encoder.encode_item_table(items)
    reader = ShardReader(part, encoder, cfg.history_len)
    mine = [s for s in range(part.shards) if s % dist.world == dist.rank]

    # one look at every shard of this rank before training: how many examples, label counts (logQ
    # and popularity are global), and on rank 0 the evaluation sample
    counts = np.zeros(len(encoder.item_ids) + 1, dtype=np.float64)
    sizes = np.zeros(6, dtype=np.float64)  # interactions, train, valid, test, examples, weighted examples
    hist_u, hist_i, sample = [], [], []
    need_history = _needs_history(cfg)
    share = min(1.0, cfg.eval_users * dist.world / max(len(users), 1))
    for s in mine:
        sd = reader.read(s)
        sp, ex = sd.split, sd.examples
        counts += np.bincount(ex.item_rows, minlength=len(counts))
        sizes += [len(sp.train) + len(sp.valid) + len(sp.test), len(sp.train), len(sp.valid), len(sp.test), len(ex),
                  int((ex.weights != 1.0).sum())]
        if need_history:
            hist_u.append(ex.user_rows)
            hist_i.append(ex.item_rows)
        if dist.is_main and len(sp.valid):
            keep = eval_sample(sp.valid["user_id"].to_numpy(dtype=object), share)
            chosen = pd.Index(sp.valid["user_id"].to_numpy(dtype=object)[keep])
            sample.append(type(sp)(*(getattr(sp, k).loc[getattr(sp, k)["user_id"].isin(chosen)]
                                     for k in ("train", "valid", "test"))))
    if len(mine) == 1:
        reader.keep(mine[0], ex)  # the epochs train on what this pass built
    n_local = int(sizes[4])
    counts = dist.sum(torch.from_numpy(counts)).numpy()
    total = dist.sum(torch.from_numpy(sizes)).numpy()
    if total[4] == 0:
        raise DataError(f"data {cfg.data!r}: no usable training interactions")
    steps, local_batch = _steps_and_batch(cfg, dist, n_local)
    batches = ShardBatches(reader, mine, batch=local_batch, seed=cfg.seed, rank=dist.rank, full_batches=dist.active)
    data, split = sample_recdata(f"csv:{src.directory.name}", sample, users, items, uspecs, ispecs)
    n_users, n_items = len(users), len(items)
    del users  # the sample keeps its own rows; the encoder and the encoded table hold the rest
    ev_valid = build_eval_set(data, split, "valid") if dist.is_main and len(split.valid) else None
    if ev_valid is not None:
        log.info("validation and test on a sample of %d users (eval_users %d)", ev_valid.n_users, cfg.eval_users)
    stats = {"name": data.name, "users": n_users, "items": n_items, "interactions": int(total[0]),
             "train_rows": int(total[1]), "valid_rows": int(total[2]), "test_rows": int(total[3]),
             "examples": int(total[4]), "shards": part.shards, "eval_users": ev_valid.n_users if ev_valid else 0}
    history = (np.concatenate(hist_u), np.concatenate(hist_i)) if hist_u else None
    release_freed_memory()
    return Prepared(data, split, encoder, batches, steps, counts[1:], history, bool(total[5] > 0), user_table,
                    item_table, ev_valid, stats, stream_dir=sdir, cfg=cfg, derived=derived)


# ------------------------------------------------------------------------------------------------
# stage 3: the model


def _tower_pair_class() -> Any:
    from torch import nn

    class _TowerPair(nn.Module):
        """Both towers as one module: what DistributedDataParallel wraps (its forward must produce every
        output whose parameters' gradients it averages)."""

        def __init__(self, user_tower: nn.Module, item_tower: nn.Module) -> None:
            super().__init__()
            self.user_tower, self.item_tower = user_tower, item_tower

        def forward(self, ubatch: dict[str, Any], ibatch: dict[str, Any]) -> tuple[Any, Any]:
            return self.user_tower(ubatch), self.item_tower(ibatch)

    return _TowerPair


@dataclass
class Built:
    model: Any                  # towers.checkpoint.TwoTowerModel (the towers being trained)
    pair: Any                   # the towers as one module, DDP-wrapped when there are several ranks
    optimizers: Any             # training.optim.Optimizers
    sampler: Any                # training.samplers.NegativeSampler
    hist_mask: Any              # training.samplers.HistoryMask | None
    user_table: dict[str, Any]  # encoded user side features, by user row
    item_table: dict[str, Any]  # encoded item features, by item row
    device: Any
    loss_name: str
    full_items: bool            # small catalogue: embed every item each step instead of gathering
    use_weights: bool


def build_model(cfg: TrainConfig, prep: Prepared, version: str, device: Any, dist: Dist) -> Built:
    import torch

    from towers.checkpoint import TwoTowerModel
    from training.optim import build_optimizers
    from training.samplers import HistoryMask, make_sampler

    torch.manual_seed(cfg.seed)  # the same initial tables on every rank (DDP broadcasts only the rest)
    meta: dict[str, Any] = {"model_version": version}
    if cfg.neighbour_weight:  # fixed: validation scores the blend from the first epoch
        set_neighbour_weight(meta, cfg.neighbour_weight)
    model = TwoTowerModel.create(cfg.tower_config(), prep.encoder, meta=meta)
    assert model.user_tower is not None and model.item_tower is not None
    if cfg.item_init == "transitions":
        from training.item_init import init_from_transitions

        if prep.stream_dir is not None:
            raise ValueError("item_init=transitions needs the interactions in memory; a streamed source holds only "
                             "an evaluation sample here (drop --stream / use a single file, or --item-init random)")
        if model.item_tower.id_emb is None:
            raise ValueError("item_init=transitions starts the item id table, and this model has none "
                             "(DSSM with --item-id-embedding off)")
        # before the towers move and the tables are tied: the tied history table is this one
        n = init_from_transitions(model.item_tower.id_emb.weight, prep.split.train, prep.encoder.item_rows)
        log.info("item table started from %d transitions of the training histories (item_init=transitions)", n)
    user_tower, item_tower = model.user_tower.to(device), model.item_tower.to(device)
    if cfg.tie_embeddings and user_tower.hist_emb is not None and item_tower.id_emb is not None:
        if user_tower.hist_emb.weight.shape != item_tower.id_emb.weight.shape:
            raise ValueError(f"tie_embeddings needs emb_dim == dim for {cfg.model} "
                             f"(history table {tuple(user_tower.hist_emb.weight.shape)}, "
                             f"item table {tuple(item_tower.id_emb.weight.shape)})")
        # one Parameter, two modules: each tower still saves (and later loads) its own copy
        user_tower.hist_emb.weight = item_tower.id_emb.weight
    optimizers = build_optimizers([user_tower, item_tower], kind=cfg.embedding_optimizer, lr=cfg.lr,
                                  table_lr=cfg.table_lr, weight_decay=cfg.weight_decay)
    pair = _tower_pair_class()(user_tower, item_tower)
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # the id tables' row-sparse gradients are averaged by Dist.average_table_grads (NCCL cannot
        # all-reduce sparse tensors; see training/distributed.py)
        table_ids = {id(p) for p in optimizers.table_params}
        ignore = [n for n, p in pair.named_parameters(remove_duplicate=False) if id(p) in table_ids]
        DDP._set_params_and_buffers_to_ignore_for_model(pair, ignore)
        pair = DDP(pair, device_ids=[device.index] if device.type == "cuda" else None)

    enc = prep.encoder
    n_items = len(enc.item_ids)
    # every rank draws an equal slice of the shared pool: round it up to a multiple of the ranks
    num_negatives = math.ceil(cfg.num_negatives / dist.world) * dist.world
    sampler = make_sampler(cfg.negatives, n_items, prep.counts, num_negatives=num_negatives,
                           alpha=cfg.popularity_alpha, hard_negatives=cfg.hard_negatives)
    hist_mask = (HistoryMask.build(*prep.history, enc.n_user_rows, enc.n_item_rows).to(device)
                 if prep.history is not None else None)
    return Built(
        model=model, pair=pair, optimizers=optimizers, sampler=sampler, hist_mask=hist_mask,
        user_table={k: v.to(device) for k, v in prep.user_table.items()},
        item_table={k: v.to(device) for k, v in prep.item_table.items()},
        device=device, loss_name="positive" if cfg.negatives == "none" else cfg.loss,
        full_items=enc.n_item_rows <= cfg.batch_size + sampler.num_extra,
        use_weights=prep.weighted,
    )


# ------------------------------------------------------------------------------------------------
# stage 4: the state that survives a restart


@dataclass
class TrainState:
    """Everything a resumed run needs besides the config, written to ``last.pt`` after every epoch.

    The resume keys are this dataclass's fields plus the weights, the optimisers and the RNG; they
    are written and read in ``save``/``restore`` and nowhere else.
    """

    epoch: int = 0                      # the last finished epoch
    best_hr: float = -1.0               # best validation HR@K so far (-1: none yet)
    best_epoch: int = 0
    bad_epochs: int = 0                 # epochs since the best one
    finished: bool = False              # early-stopped or all epochs done
    epochs: list[dict[str, Any]] = field(default_factory=list)  # one record per epoch (metrics.json)

    def save(self, path: Path, built: Built) -> None:
        import torch

        from towers.checkpoint import atomic_torch_save, checkpoint_payload

        atomic_torch_save({
            "format": STATE_FORMAT, "epoch": self.epoch, "best_hr": self.best_hr, "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs, "finished": self.finished, "epochs_json": json.dumps(self.epochs),
            "model": checkpoint_payload(built.model), "optimizer": built.optimizers.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }, path)

    @classmethod
    def restore(cls, path: Path, built: Built) -> TrainState:
        import torch

        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DataError(f"cannot read resume state ({exc.__class__.__name__}: {exc})", path=path) from exc
        if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
            found = saved.get("format") if isinstance(saved, dict) else None
            raise DataError(f"not a {STATE_FORMAT} file (found {found!r}: written by another version of "
                            "the training job, which cannot be resumed by this one)", path=path)
        model = built.model
        model.user_tower.load_state_dict(saved["model"]["user_tower"])
        model.item_tower.load_state_dict(saved["model"]["item_tower"])
        built.optimizers.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["torch_rng"])
        return cls(epoch=int(saved["epoch"]), best_hr=float(saved["best_hr"]), best_epoch=int(saved["best_epoch"]),
                   bad_epochs=int(saved["bad_epochs"]), finished=bool(saved["finished"]),
                   epochs=json.loads(saved["epochs_json"]))


# ------------------------------------------------------------------------------------------------
# stage 5: one epoch


def batch_loss(cfg: TrainConfig, built: Built, dist: Dist, batch: dict[str, Any], gen_neg: Any,
               gen_drop: Any, positives: Any = None) -> Any:
    """The loss of one batch on this rank: its users against the candidates of EVERY rank (all
    positives, then the shared pool of sampled negatives), so the negatives are the global batch.

    Returns this rank's share of the global mean: averaged over ranks (as DDP averages gradients),
    it is the loss one process computes on the concatenated batch. ``positives``: when the caller
    started gathering every rank's positive rows for this batch already (``with_positives``), the
    function that waits for them.
    """
    import torch

    from towers.features import gather_rows
    from training.losses import retrieval_loss

    dev, sampler, W, r = built.device, built.sampler, dist.world, dist.rank
    urows = batch["user_row"].to(dev)  # (b,)
    b = urows.shape[0]
    ubatch = gather_rows(built.user_table, urows)
    ubatch["hist"] = batch["hist"].to(dev)  # (b, L)
    if cfg.user_id_dropout > 0:
        drop = (torch.rand(b, generator=gen_drop) < cfg.user_id_dropout).to(dev)
        ubatch["user_row"] = urows.masked_fill(drop, 0)
    pos = batch["item_row"].to(dev)  # (b,)
    pool = sampler.extra(b * W, gen_neg).to(dev)  # (M,) the same on every rank: one shared generator
    # only the positives' row numbers cross ranks (one small all_gather); every rank then embeds the
    # whole global candidate list itself. Its gradients reach the item tower on every rank and are
    # averaged with the rest (DDP for the dense layers, average_table_grads for the id rows), which
    # by linearity is the gradient of one process on the concatenated batch. Gathering the vectors
    # instead (all_gather with autograd) cost two more collectives a step, one of them in backward.
    rows = [r.to(dev) for r in positives()] if positives is not None else dist.gather(pos)
    cand = torch.cat([rows[r]] + [rows[j] for j in range(W) if j != r] + [pool])  # (W b + M,) own first
    if built.full_items:
        u, v_all = built.pair(ubatch, built.item_table)  # (b, D), (N + 1, D)
        v = v_all[cand]
    else:
        u, v = built.pair(ubatch, gather_rows(built.item_table, cand))  # (b, D), (W b + M, D)
    global_b = b * W
    logq = sampler.log_expected_count(cand.cpu(), global_b).to(dev)
    hm = built.hist_mask(urows, cand) if built.hist_mask is not None else None
    per_row = retrieval_loss(u, v, cand, logq, temperature=cfg.temperature, loss=built.loss_name,
                             logq_correction=cfg.logq_correction, mask_accidental_hits=True,
                             in_batch_negatives=sampler.in_batch, history_mask=hm,
                             hard_negatives=sampler.hard_negatives, reduction="none")  # (b,)
    if not built.use_weights:
        return per_row.mean()
    w = batch["weight"].to(dev).to(per_row.dtype)
    total_w = dist.sum(w.sum().detach())
    return (per_row * w).sum() * W / total_w.clamp_min(1e-12)


def with_positives(batches: Any, dist: Dist) -> Any:
    """(batch, a wait for every rank's positive rows of it), the next batch's all_gather already
    under way while this one trains: that gather is the first collective of a step, where a rank
    otherwise waits a round trip (1-3 ms over gloo on the benchmark machine) before it can build the
    global candidate list. One process: nothing to gather (None)."""
    if not dist.active:
        for batch in batches:
            yield batch, None
        return
    it = iter(batches)
    batch = next(it, None)
    pending = dist.gather_soon(batch["item_row"]) if batch is not None else None
    while batch is not None:
        nxt = next(it, None)
        following = dist.gather_soon(nxt["item_row"]) if nxt is not None else None
        yield batch, pending
        batch, pending = nxt, following


def total_steps(cfg: TrainConfig, steps: int) -> int:
    """Optimiser steps of the whole run: every epoch, or the ``max_steps`` budget if smaller."""
    assert cfg.epochs is not None  # derived from the data by prepare_data
    return min(cfg.epochs * steps, cfg.max_steps) if cfg.max_steps else cfg.epochs * steps


def train_epoch(cfg: TrainConfig, built: Built, batches: Any, steps: int, epoch: int, dist: Dist,
                mdir: Path, show_bar: bool) -> dict[str, Any]:
    """One pass over this rank's batches: loss, backward, the id tables' gradients averaged over ranks,
    optimiser step. Returns the epoch's record (loss and examples/s over every rank)."""
    import torch

    built.pair.train()
    gen_neg = torch.Generator(device="cpu").manual_seed(epoch_seed(cfg.seed, epoch, 1))  # shared by ranks
    gen_drop = torch.Generator(device="cpu").manual_seed(epoch_seed(cfg.seed, epoch, 3, dist.rank))
    torch.manual_seed(epoch_seed(cfg.seed, epoch, 2, dist.rank))  # dropout layers
    pause = tuple(int(x) for x in cfg.pause_at.split(":")) if cfg.pause_at else None
    run_steps = total_steps(cfg, steps)
    todo = max(0, min(steps, run_steps - (epoch - 1) * steps))  # the max_steps budget may end it early
    batches.dataset.set_epoch(epoch)  # (before the loader's iterator: workers get a copy)
    bar = None
    if show_bar:
        from tqdm import tqdm

        bar = tqdm(total=todo, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False)
    t0 = time.perf_counter()
    total_loss, seen = 0.0, 0
    opts = built.optimizers
    for s, (batch, positives) in enumerate(with_positives(itertools.islice(batches, todo), dist)):
        b = int(batch["item_row"].shape[0])
        if b * dist.world < 2 and built.sampler.in_batch and built.sampler.num_extra == 0:
            continue  # a lone row has no in-batch negative
        try:
            loss = batch_loss(cfg, built, dist, batch, gen_neg, gen_drop, positives)
            if cfg.lr_schedule == "cosine":
                # a function of the global step only, so a resumed run follows the same curve
                opts.set_lr_factor(0.5 * (1.0 + math.cos(math.pi * ((epoch - 1) * steps + s) / max(1, run_steps))))
            opts.zero_grad()
            loss.backward()
            dist.average_table_grads(opts.table_params)
            opts.step()
        except RuntimeError as exc:
            if dist.active and is_collective_failure(exc):
                raise RankLostError(f"rank {dist.rank}: a collective failed in epoch {epoch} step {s} ({exc}); "
                                  "another rank has probably died. The job stops; continue it from the last "
                                  f"completed epoch with --resume {mdir.name}") from exc
            raise
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise FloatingPointError(f"training diverged at epoch {epoch} step {s} (loss {lv}); "
                                     "try a lower --lr or a higher --temperature")
        total_loss += lv * b
        seen += b
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{lv:.4f}",
                            samples_s=f"{seen * dist.world / max(time.perf_counter() - t0, 1e-9):.0f}")
        if pause == (epoch, s + 1):
            _wait_to_be_killed(mdir, dist.rank, epoch, s + 1)
    if bar is not None:
        bar.close()
    train_s = time.perf_counter() - t0
    loss_sum, n = dist.sum(torch.tensor([total_loss, float(seen)], dtype=torch.float64)).tolist()
    return {"epoch": epoch, "loss": loss_sum / max(n, 1.0), "samples_per_s": n / max(train_s, 1e-9),
            "train_s": train_s, "steps": todo, "last": (epoch - 1) * steps + todo >= run_steps}


def _wait_to_be_killed(mdir: Path, rank: int, epoch: int, step: int) -> None:
    """The ``pause_at`` test hook: say where we are in a file, then do nothing until killed."""
    atomic_write(mdir / f"paused-{rank}", f"{epoch}:{step} {os.getpid()}\n")
    log.warning("rank %d paused after epoch %d step %d as asked (pause_at); waiting to be killed", rank, epoch, step)
    while True:
        time.sleep(3600)


# ------------------------------------------------------------------------------------------------
# stage 6: the end of an epoch and of the run


def eval_item_vectors(model: Any, built: Built, item_ids: np.ndarray) -> np.ndarray | None:
    """(N, D) vectors of ``item_ids`` by ``model``'s item tower from the table training encoded once
    (``model.embed_items`` re-encodes the side features in Python: 14 of its 16 s at 1M items, at
    every validation). None where an id is not in the table: the caller embeds the frame then."""
    rows = model.encoder.item_rows(item_ids)
    if len(rows) and int(rows.min()) == 0:
        return None
    return model.embed_item_rows(built.item_table, rows)


def validate(cfg: TrainConfig, built: Built, prep: Prepared, dist: Dist, record: dict[str, Any]) -> float | None:
    """Validation HR@K with seen items masked (rank 0 scores, every rank gets the number).

    When the neighbour weight is left to the data (training/blend.py), the same scores also choose
    it for this epoch's towers, into ``record["neighbours"]``; the HR@K is the towers' alone (weight 0).
    """
    from training.evaluate import evaluate_model, model_scorer

    hr = None
    if dist.is_main and prep.eval_valid is not None:
        release_freed_memory()  # what the epoch's shards left behind, before the scores come on top
        ev = prep.eval_valid
        item_vecs = eval_item_vectors(built.model, built, ev.item_ids)
        if prep.neighbours is None and prep.stream_dir is None and cfg.neighbour_weight != 0:
            from training.blend import neighbours_from

            prep.neighbours = neighbours_from(prep.split.train, ev.item_ids)  # once per run, training split only
        if cfg.neighbour_weight is None and prep.neighbours is not None:
            from training.blend import choose_weight

            weight, curve, why = choose_weight(model_scorer(built.model, prep.data, ev, item_vecs=item_vecs), ev,
                                               prep.neighbours, cfg.eval_k)
            hr = curve[0.0]
            record["neighbours"] = {"weight": weight, "why": why,
                                    f"valid_hr@{cfg.eval_k}": {f"{w:g}": h for w, h in curve.items()}}
        else:
            res = evaluate_model(built.model, prep.data, prep.split, which="valid", ks=(cfg.eval_k,),
                                 mask_seen="masked", ev=ev, item_vecs=item_vecs, neighbours=prep.neighbours)
            hr = float(res["masked"][f"HR@{cfg.eval_k}"])
    built.pair.train()
    return dist.broadcast(hr)


def end_epoch(cfg: TrainConfig, state: TrainState, built: Built, run: RunDir, record: dict[str, Any],
              hr: float | None, dist: Dist) -> None:
    """Book-keeping after an epoch: best epoch -> model.pt, early stopping, last.pt (rank 0 writes)."""
    from towers.checkpoint import save_checkpoint

    improved = hr is None or hr > state.best_hr + 1e-12
    if improved:
        state.best_hr, state.best_epoch, state.bad_epochs = (hr if hr is not None else state.best_hr), record["epoch"], 0
        if "neighbours" in record:  # chosen for these towers: model.pt carries it (absent: weight 0)
            set_neighbour_weight(built.model.meta, record["neighbours"]["weight"])
        if dist.is_main:
            save_checkpoint(run.dir / "model.pt", built.model,
                            meta={**built.model.meta, "model_version": run.version, "epoch": record["epoch"],
                                  f"valid_hr@{cfg.eval_k}": hr, "data": cfg.data})
    else:
        state.bad_epochs += 1
    record["valid_hr"] = hr
    state.epochs.append(record)
    state.epoch = record["epoch"]
    if dist.is_main:
        msg = (f"epoch {state.epoch}: loss {record['loss']:.4f}, valid HR@{cfg.eval_k} "
               f"{'-' if hr is None else f'{hr:.4f}'}, {record['samples_per_s']:.0f} samples/s, "
               f"{record['train_s']:.1f}s" + (f" ({dist.world} ranks)" if dist.active else ""))
        log.info(msg)
        if not cfg.quiet and not log.isEnabledFor(logging.INFO):
            print(msg, file=sys.stderr)
    if state.bad_epochs >= cfg.patience:
        if dist.is_main:
            log.info("early stopping: no better valid HR@%d for %d epochs (best %.4f at epoch %d)",
                     cfg.eval_k, cfg.patience, state.best_hr, state.best_epoch)
        state.finished = True
    if record.pop("last"):  # all epochs, or the max_steps budget, done
        state.finished = True
    if dist.is_main:
        state.save(run.dir / "last.pt", built)


def write_config(cfg: TrainConfig, run: RunDir, prep: Prepared, built: Built) -> None:
    """config.json: the settings, the tower config, the data's sizes and the sampler."""
    _write_json(run.dir / "config.json", {
        "model_version": run.version,
        # the spec that reloads exactly this data: synthetic data with options is reloaded from the
        # snapshot (the evaluator's --data default), file data from its source
        "data": cfg.data if cfg.data.strip().lower() != "synthetic" else f"csv:{(run.dir / 'data').resolve()}",
        "train": cfg.to_dict(),
        "tower": cfg.tower_config().to_dict(),
        "dataset": prep.stats,
        "sampler": built.sampler.describe(),
        "derived": prep.derived,  # {setting: {value, why}} for the settings the data decided
    })


def neighbour_choice(cfg: TrainConfig, prep: Prepared, state: TrainState) -> dict[str, Any]:
    """What the model was published with for the last item's neighbours (training/blend.py), and why:
    for metrics.json. The best epoch's validation chose it (and wrote it into model.pt's meta)."""
    if cfg.neighbour_weight is not None:
        return {"weight": float(cfg.neighbour_weight), "why": "set in the config"}
    if prep.stream_dir is not None:
        return {"weight": 0.0, "why": "a streamed source holds no whole training split to count neighbours from"}
    best = next((e for e in state.epochs if e["epoch"] == state.best_epoch), {})
    return best.get("neighbours", {"weight": 0.0, "why": "no validation split to choose it on"})


def finish(cfg: TrainConfig, run: RunDir, prep: Prepared, built: Built, state: TrainState, device: Any,
           threads: int, times: dict[str, float], resumed_from: int | None, dist: Dist) -> TrainResult:
    """Rank 0: the best epoch on the test split (masked and raw), metrics.json, curves.png, LATEST."""
    import torch

    from towers.checkpoint import load_checkpoint
    from training.evaluate import evaluate_model
    from training.plots import plot_curves

    rss = [float(x) for x in dist.gather(torch.tensor([peak_rss_mb()], dtype=torch.float64))]
    if not dist.is_main:
        return TrainResult(run.version, run.dir, {"rank": dist.rank, "epochs": state.epochs})
    split = prep.split
    # the weights in memory ARE model.pt when the last epoch was the best (always with a step budget
    # of one epoch): reloading would hold a second copy of every table at once
    best = built.model if state.best_epoch == state.epoch else load_checkpoint(run.dir / "model.pt")
    blend = neighbour_choice(cfg, prep, state)
    if blend["weight"]:
        log.info("recall blends in the last item's neighbours at weight %g: %s", blend["weight"], blend["why"])
    test = (evaluate_model(best, prep.data, split, which="test", ks=(10, 50, 100),
                           item_vecs=eval_item_vectors(best, built, prep.data.items.index.to_numpy()), per_user=True)
            if len(split.test) else None)
    test_per_user = test.pop("per_user") if test is not None else None
    rss[0] = peak_rss_mb()  # the test evaluation included
    metrics: dict[str, Any] = {
        "model_version": run.version,
        "data": cfg.data,
        "model": cfg.model,
        "negatives": cfg.negatives,
        "loss": "positive" if cfg.negatives == "none" else cfg.loss,
        "embedding_optimizer": cfg.embedding_optimizer,
        "epochs": state.epochs,
        "best_epoch": state.best_epoch,
        f"best_valid_hr@{cfg.eval_k}": state.best_hr if state.best_hr >= 0 else None,
        "test": test,
        "device": str(device),
        "ranks": dist.world,
        "threads": threads if device.type == "cpu" else None,
        "wall_time_s": time.perf_counter() - times["start"],
        "prepare_s": times["prepare"],
        "train_time_s": sum(e["train_s"] for e in state.epochs),
        "steps": sum(e.get("steps", 0) for e in state.epochs),
        "peak_rss_mb": rss[0],
        "peak_rss_mb_per_rank": rss,
        "cuda_max_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "derived": prep.derived,
        "neighbours": blend,
    }
    if resumed_from is not None:
        metrics["resumed_from_epoch"] = resumed_from
    _write_json(run.dir / "metrics.json", metrics)
    plot_curves(state.epochs, run.dir / "curves.png", k=cfg.eval_k,
                title=f"{cfg.model} / {cfg.negatives} on {prep.data.name}")
    update_latest(run.dir.parent, run.version)
    if prep.stream_dir is not None:
        shutil.rmtree(prep.stream_dir, ignore_errors=True)  # the shards only served this run
    if test is not None:
        log.info("model %s: test HR@50 masked %.4f raw %.4f (best epoch %d) in %.1fs, peak memory %.0f MiB",
                 run.version, test["masked"]["HR@50"], test["raw"]["HR@50"], state.best_epoch,
                 metrics["wall_time_s"], max(rss))
    return TrainResult(run.version, run.dir, metrics, test_per_user)


# ------------------------------------------------------------------------------------------------
# the job


def run(cfg: TrainConfig, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train, validate each epoch, early-stop, test the best epoch, write the model version.

    ``on_epoch``: called with each epoch's record after its validation (``valid_hr``, and
    ``neighbours`` where the blend was chosen); an exception it raises ends the run there, with no
    test and no model version (``twotower tune`` stops a trial that is not worth finishing this way).
    """
    import torch

    t_start = time.perf_counter()
    reuse_freed_blocks()  # each step's tensors reuse the last step's pages (training/memory.py)
    device = _pick_device(cfg.device)
    dist = Dist.from_env(device.type)
    try:
        if dist.active and device.type == "cuda":
            device = torch.device("cuda", dist.local_rank)
        run_dir = start_run(cfg, dist)
        cfg = run_dir.cfg
        threads = cfg.num_threads or max(1, idle_cores() // dist.local_world)
        torch.set_num_threads(threads)

        t_prep = time.perf_counter()
        prep = prepare_data(cfg, dist, run_dir)
        cfg = prep.cfg  # with the settings derived from the data
        assert cfg.epochs is not None
        if run_dir.resuming:  # derived when the run started: its config.json says what and why
            prep.derived = json.loads((run_dir.dir / "config.json").read_text()).get("derived", {})
        times = {"start": t_start, "prepare": time.perf_counter() - t_prep}
        built = build_model(cfg, prep, run_dir.version, device, dist)
        state = TrainState()
        if run_dir.resuming:
            state = TrainState.restore(run_dir.dir / "last.pt", built)
            log.info("resuming %s after epoch %d", run_dir.version, state.epoch)
        resumed_from = state.epoch if run_dir.resuming else None
        if dist.is_main:
            write_config(cfg, run_dir, prep, built)

        batches = loader(prep.batches, cfg.loader_workers)
        show_bar = dist.is_main and not cfg.quiet and sys.stderr.isatty()
        while not state.finished and state.epoch < cfg.epochs:
            record = train_epoch(cfg, built, batches, prep.steps, state.epoch + 1, dist, run_dir.dir, show_bar)
            end_epoch(cfg, state, built, run_dir, record, validate(cfg, built, prep, dist, record), dist)
            if on_epoch is not None:
                on_epoch(record)
            if cfg.stop_after_epoch is not None and state.epoch >= cfg.stop_after_epoch and not state.finished:
                log.info("stopping after epoch %d as asked; continue with --resume %s", state.epoch, run_dir.version)
                dist.barrier()
                return TrainResult(run_dir.version, run_dir.dir,
                                   {"interrupted_after_epoch": state.epoch, "epochs": state.epochs})
        result = finish(cfg, run_dir, prep, built, state, device, threads, times, resumed_from, dist)
        dist.barrier()
        return result
    finally:
        # the DDP wrapper holds the process group (and gloo's worker threads) through reference
        # cycles: left to the interpreter's exit, that teardown aborted a rank now and then
        # ("terminate called without an active exception", about 1 run in 25 under load). Free
        # them here, while everything is alive, then destroy the group.
        built = batches = None  # type: ignore[assignment]  # noqa: F841
        gc.collect()
        dist.close()
