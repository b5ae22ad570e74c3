"""The training job: ``run(TrainConfig(...)) -> TrainResult``.

Examples are YoutubeDNN-style next-item predictions: for every training interaction of a user (in
time order) the user tower reads the items the user had BEFORE it (the last ``history_len``), the
user's features and the user id (dropped to the out-of-vocabulary row with ``user_id_dropout`` so a
new user served with an inline history still gets a trained path), and the label is the item.
Everything is precomputed once as tensors: a (N, L) history matrix, encoded user/item feature
tables gathered by row per batch.

Each epoch: a seeded shuffle (a function of (seed, epoch) only, so a resumed run replays the exact
same batches), negatives from the chosen sampler, the retrieval loss, then validation HR@K with
seen items masked via the shared evaluator. The best epoch is saved as ``model.pt``; ``last.pt``
holds everything needed to resume. Nothing points at the version (``models/LATEST``) until it is
complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from towers.artifacts import (
    LATEST,
    MODELS_DIR,
    atomic_open,
    atomic_write_json,
    model_dir,
    new_version,
    versions,
    write_pointer,
)
from towers.schema import DataError
from training.config import _RUNTIME_FIELDS, TrainConfig

log = logging.getLogger(__name__)

STATE_FORMAT = "twotower-train-state/1"


@dataclass
class TrainResult:
    model_version: str
    dir: Path
    metrics: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.dir / "model.pt"


# ------------------------------------------------------------------------------------------------
# example construction (vectorised)


@dataclass
class Examples:
    """Next-item training examples in (user, time) order."""

    user_rows: np.ndarray   # (N,) int64
    item_rows: np.ndarray   # (N,) int64, the label
    hist: np.ndarray        # (N, L) int64 item rows before the label, oldest first, 0-padded right
    weights: np.ndarray     # (N,) float32


def _rows_for(index: pd.Index, values: pd.Series | np.ndarray) -> np.ndarray:
    """Row r >= 1 of each value in ``index`` (catalogue/user order), 0 when unknown."""
    return (index.get_indexer(values) + 1).astype(np.int64)


def build_examples(train: pd.DataFrame, user_index: pd.Index, item_index: pd.Index, history_len: int) -> Examples:
    user_rows = _rows_for(user_index, train["user_id"].astype(str).to_numpy(dtype=object))
    item_rows = _rows_for(item_index, train["item_id"].to_numpy())
    keep = (user_rows > 0) & (item_rows > 0)
    if not keep.all():
        log.warning("%d training rows name users or items outside the tables; skipped", int((~keep).sum()))
    ts = train["timestamp"].to_numpy(dtype=np.int64)[keep]
    w = train["weight"].to_numpy(dtype=np.float64)[keep] if "weight" in train else np.ones(int(keep.sum()))
    u, it = user_rows[keep], item_rows[keep]
    n = len(u)
    # time order per user; ties keep the log's order (the same rule as the split and the evaluator)
    order = np.lexsort((np.arange(n), ts, u))
    u, it, w = u[order], it[order], w[order]
    first = np.searchsorted(u, u, side="left")  # index of each row's user's first example
    pos = np.arange(n) - first  # how many earlier interactions this user has
    k = np.minimum(pos, history_len)  # (N,) history length actually available
    j = np.arange(history_len)[None, :]  # (1, L)
    src = np.arange(n)[:, None] - k[:, None] + j  # (N, L) rows of the last k items before each label
    valid = j < k[:, None]
    hist = np.where(valid, it[np.clip(src, 0, max(n - 1, 0))], 0).astype(np.int64)
    return Examples(user_rows=u, item_rows=it, hist=hist, weights=w.astype(np.float32))


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


def idle_cores() -> int:
    """CPU threads worth using now: the cores not already busy (1-minute load average), at least 1.

    Intra-op threads that share an oversubscribed core spin-wait on each other: on a 2-core machine
    with two other busy processes, 2 threads ran a training step 7x slower than 1 thread. Results do
    not depend on the thread count (checked bit for bit for this model), only the speed does.
    """
    cores = max(1, os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return cores
    return int(min(cores, max(1, round(cores - load))))


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    # one independent, reproducible stream per (seed, epoch, purpose)
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


# ------------------------------------------------------------------------------------------------
# the job


def run(cfg: TrainConfig) -> TrainResult:
    """Train, validate each epoch, early-stop, test the best epoch, write the model version."""
    import torch

    from towers.checkpoint import TwoTowerModel, atomic_torch_save, checkpoint_payload, load_checkpoint
    from towers.features import FeatureEncoder, gather_rows
    from training.data import load_data, split_leave_last_out
    from training.evaluate import build_eval_set, evaluate_model
    from training.losses import retrieval_loss
    from training.plots import plot_curves
    from training.samplers import HistoryMask, make_sampler

    t_start = time.perf_counter()
    resume_state: dict[str, Any] | None = None
    if cfg.resume:
        mdir = resolve_resume_dir(cfg.artifacts, cfg.resume)
        saved = json.loads((mdir / "config.json").read_text())["train"]
        runtime = {k: getattr(cfg, k) for k in _RUNTIME_FIELDS}
        cfg = TrainConfig.from_dict({**saved, **runtime})
        version = mdir.name
        try:
            resume_state = torch.load(mdir / "last.pt", map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DataError(f"cannot read resume state ({exc.__class__.__name__}: {exc})",
                            path=mdir / "last.pt") from exc
        if not isinstance(resume_state, dict) or resume_state.get("format") != STATE_FORMAT:
            raise DataError(f"not a {STATE_FORMAT} file", path=mdir / "last.pt")
        log.info("resuming %s after epoch %d", version, resume_state["epoch"])
    else:
        version = new_version()
        mdir = Path(cfg.artifacts) / "models" / version
    models_dir = mdir.parent

    threads = cfg.num_threads or idle_cores()
    torch.set_num_threads(threads)
    device = _pick_device(cfg.device)

    # ---- data
    data = load_data(cfg.data, **cfg.data_options)
    split = split_leave_last_out(data)
    if len(split.train) == 0:
        raise DataError(f"data {cfg.data!r}: the training split is empty")
    encoder = FeatureEncoder.fit(data.users, data.items, data.user_features, data.item_features,
                                 history_len=cfg.history_len)
    user_index = pd.Index(encoder.user_ids)
    item_index = pd.Index(encoder.item_ids)
    ex = build_examples(split.train, user_index, item_index, cfg.history_len)
    n_ex = len(ex.item_rows)
    if n_ex == 0:
        raise DataError(f"data {cfg.data!r}: no usable training interactions")
    n_items = len(encoder.item_ids)
    counts = np.bincount(ex.item_rows, minlength=n_items + 1)[1:].astype(np.float64)  # (N,) label counts
    has_valid = len(split.valid) > 0
    ev_valid = build_eval_set(data, split, "valid") if has_valid else None

    # ---- model, tables and sampler
    torch.manual_seed(cfg.seed)
    tower_cfg = cfg.tower_config()
    model = TwoTowerModel.create(tower_cfg, encoder, meta={"model_version": version})
    assert model.user_tower is not None and model.item_tower is not None
    user_tower, item_tower = model.user_tower.to(device), model.item_tower.to(device)
    if cfg.tie_embeddings and user_tower.hist_emb is not None and item_tower.id_emb is not None:
        if user_tower.hist_emb.weight.shape != item_tower.id_emb.weight.shape:
            raise ValueError(f"tie_embeddings needs emb_dim == dim for {cfg.model} "
                             f"(history table {tuple(user_tower.hist_emb.weight.shape)}, "
                             f"item table {tuple(item_tower.id_emb.weight.shape)})")
        # one Parameter, two modules: each tower still saves (and later loads) its own copy
        user_tower.hist_emb.weight = item_tower.id_emb.weight
    params = list({id(p): p for m in (user_tower, item_tower) for p in m.parameters()}.values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    user_table = {k: v.to(device) for k, v in encoder.encode_user_table(data.users).items()}
    item_table = {k: v.to(device) for k, v in encoder.encode_item_table(data.items).items()}
    t_user_rows = torch.from_numpy(ex.user_rows).to(device)
    t_item_rows = torch.from_numpy(ex.item_rows).to(device)
    t_hist = torch.from_numpy(ex.hist).to(device)
    t_w = torch.from_numpy(ex.weights).to(device)
    use_weights = bool((ex.weights != 1.0).any())
    sampler = make_sampler(cfg.negatives, n_items, counts, num_negatives=cfg.num_negatives,
                           alpha=cfg.popularity_alpha, hard_negatives=cfg.hard_negatives)
    hist_mask = (HistoryMask.build(ex.user_rows, ex.item_rows, encoder.n_user_rows, encoder.n_item_rows).to(device)
                 if (cfg.mask_history_hits or sampler.name == "hard") and sampler.name != "none" else None)
    loss_name = "positive" if cfg.negatives == "none" else cfg.loss
    # small catalogues: embedding every item once per step is cheaper than gathering candidates
    full_items = encoder.n_item_rows <= cfg.batch_size + sampler.num_extra

    # ---- bookkeeping, possibly restored
    epochs_log: list[dict[str, Any]] = []
    best_hr, best_epoch, bad_epochs, start_epoch, finished = -1.0, 0, 0, 1, False
    if resume_state is not None:
        user_tower.load_state_dict(resume_state["model"]["user_tower"])
        item_tower.load_state_dict(resume_state["model"]["item_tower"])
        optimizer.load_state_dict(resume_state["optimizer"])
        epochs_log = json.loads(resume_state["epochs_json"])
        best_hr, best_epoch = float(resume_state["best_hr"]), int(resume_state["best_epoch"])
        bad_epochs, finished = int(resume_state["bad_epochs"]), bool(resume_state["finished"])
        start_epoch = int(resume_state["epoch"]) + 1
        torch.set_rng_state(resume_state["torch_rng"])
    else:
        mdir.mkdir(parents=True, exist_ok=False)
        write_data_snapshot(data, mdir / "data")
    config_doc = {
        "model_version": version,
        # the spec that reloads exactly this data: synthetic data with options is reloaded from the
        # snapshot (the evaluator's --data default), file data from its source
        "data": cfg.data if cfg.data.strip().lower() != "synthetic" else f"csv:{(mdir / 'data').resolve()}",
        "train": cfg.to_dict(),
        "tower": tower_cfg.to_dict(),
        "dataset": {"name": data.name, "users": len(data.users), "items": len(data.items),
                    "interactions": len(data.interactions), "train_rows": len(split.train),
                    "valid_rows": len(split.valid), "test_rows": len(split.test), "examples": n_ex},
        "sampler": sampler.describe(),
    }
    _write_json(mdir / "config.json", config_doc)

    def save_state(epoch: int) -> None:
        state = {
            "format": STATE_FORMAT, "epoch": epoch, "model": checkpoint_payload(model),
            "optimizer": optimizer.state_dict(), "best_hr": best_hr, "best_epoch": best_epoch,
            "bad_epochs": bad_epochs, "finished": finished, "epochs_json": json.dumps(epochs_log),
            "torch_rng": torch.get_rng_state(),
        }
        atomic_torch_save(state, mdir / "last.pt")

    def validate() -> float | None:
        if ev_valid is None:
            return None
        res = evaluate_model(model, data, split, which="valid", ks=(cfg.eval_k,), mask_seen="masked", ev=ev_valid)
        user_tower.train()
        item_tower.train()
        return float(res["masked"][f"HR@{cfg.eval_k}"])

    show_bar = not cfg.quiet and sys.stderr.isatty()
    steps = math.ceil(n_ex / cfg.batch_size)
    epoch = start_epoch - 1
    for epoch in range(start_epoch, cfg.epochs + 1):
        if finished:
            break
        user_tower.train()
        item_tower.train()
        # data order, negatives and dropout are functions of (seed, epoch): resume replays them exactly
        perm = torch.from_numpy(np.random.default_rng(_epoch_seed(cfg.seed, epoch, 0)).permutation(n_ex)).to(device)
        gen = torch.Generator(device="cpu").manual_seed(_epoch_seed(cfg.seed, epoch, 1))
        torch.manual_seed(_epoch_seed(cfg.seed, epoch, 2))
        t0 = time.perf_counter()
        total_loss, seen = 0.0, 0
        bar = None
        if show_bar:
            from tqdm import tqdm

            bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False)
        for s in range(steps):
            idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            B = idx.shape[0]
            if B < 2 and sampler.in_batch and sampler.num_extra == 0:
                continue  # a lone row has no in-batch negative
            urows = t_user_rows[idx]  # (B,)
            ubatch = gather_rows(user_table, urows)
            ubatch["hist"] = t_hist[idx]  # (B, L)
            if cfg.user_id_dropout > 0:
                drop = (torch.rand(B, generator=gen) < cfg.user_id_dropout).to(device)
                ubatch["user_row"] = urows.masked_fill(drop, 0)
            pos = t_item_rows[idx]  # (B,)
            cand = torch.cat([pos, sampler.extra(B, gen).to(device)])  # (B + M,)
            u = user_tower(ubatch)  # (B, D)
            if full_items:
                v = item_tower(item_table)[cand]  # (N + 1, D) -> (B + M, D)
            else:
                v = item_tower(gather_rows(item_table, cand))  # (B + M, D)
            logq = sampler.log_expected_count(cand.cpu(), B).to(device)
            hm = hist_mask(urows, cand) if hist_mask is not None else None
            loss = retrieval_loss(u, v, cand, logq, temperature=cfg.temperature, loss=loss_name,
                                  logq_correction=cfg.logq_correction, mask_accidental_hits=True,
                                  in_batch_negatives=sampler.in_batch, history_mask=hm,
                                  hard_negatives=sampler.hard_negatives,
                                  weights=t_w[idx] if use_weights else None)
            if cfg.lr_schedule == "cosine":
                # a function of the global step only, so a resumed run follows the same curve
                frac = ((epoch - 1) * steps + s) / max(1, cfg.epochs * steps)
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * frac))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise FloatingPointError(f"training diverged at epoch {epoch} step {s} (loss {lv}); "
                                         "try a lower --lr or a higher --temperature")
            total_loss += lv * B
            seen += B
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{lv:.4f}", samples_s=f"{seen / max(time.perf_counter() - t0, 1e-9):.0f}")
        if bar is not None:
            bar.close()
        train_s = time.perf_counter() - t0
        hr = validate()
        improved = hr is None or hr > best_hr + 1e-12
        if improved:
            best_hr, best_epoch, bad_epochs = (hr if hr is not None else best_hr), epoch, 0
            from towers.checkpoint import save_checkpoint

            save_checkpoint(mdir / "model.pt", model, meta={"model_version": version, "epoch": epoch,
                                                            f"valid_hr@{cfg.eval_k}": hr, "data": cfg.data})
        else:
            bad_epochs += 1
        record = {"epoch": epoch, "loss": total_loss / max(seen, 1), "valid_hr": hr,
                  "samples_per_s": seen / max(train_s, 1e-9), "train_s": train_s,
                  "eval_s": time.perf_counter() - t0 - train_s}
        epochs_log.append(record)
        msg = (f"epoch {epoch}: loss {record['loss']:.4f}, valid HR@{cfg.eval_k} "
               f"{'-' if hr is None else f'{hr:.4f}'}, {record['samples_per_s']:.0f} samples/s, {train_s:.1f}s")
        log.info(msg)
        if not cfg.quiet and not log.isEnabledFor(logging.INFO):
            print(msg, file=sys.stderr)
        if bad_epochs >= cfg.patience:
            log.info("early stopping: no better valid HR@%d for %d epochs (best %.4f at epoch %d)",
                     cfg.eval_k, cfg.patience, best_hr, best_epoch)
            finished = True
        if epoch == cfg.epochs:
            finished = True
        save_state(epoch)
        if cfg.stop_after_epoch is not None and epoch >= cfg.stop_after_epoch and not finished:
            log.info("stopping after epoch %d as asked; continue with --resume %s", epoch, version)
            return TrainResult(version, mdir, {"interrupted_after_epoch": epoch, "epochs": epochs_log})

    # ---- the best epoch on the test split (masked and raw), then publish
    best = load_checkpoint(mdir / "model.pt")
    test = evaluate_model(best, data, split, which="test", ks=(10, 50, 100)) if len(split.test) else None
    metrics: dict[str, Any] = {
        "model_version": version,
        "data": cfg.data,
        "model": cfg.model,
        "negatives": cfg.negatives,
        "loss": loss_name,
        "epochs": epochs_log,
        "best_epoch": best_epoch,
        f"best_valid_hr@{cfg.eval_k}": best_hr if best_hr >= 0 else None,
        "test": test,
        "device": str(device),
        "threads": threads if device.type == "cpu" else None,
        "wall_time_s": time.perf_counter() - t_start,
        "train_time_s": sum(e["train_s"] for e in epochs_log),
    }
    if resume_state is not None:
        metrics["resumed_from_epoch"] = start_epoch - 1
    _write_json(mdir / "metrics.json", metrics)
    plot_curves(epochs_log, mdir / "curves.png", k=cfg.eval_k, title=f"{cfg.model} / {cfg.negatives} on {data.name}")
    update_latest(models_dir, version)
    if test is not None:
        log.info("model %s: test HR@50 masked %.4f raw %.4f (best epoch %d) in %.1fs", version,
                 test["masked"]["HR@50"], test["raw"]["HR@50"], best_epoch, metrics["wall_time_s"])
    return TrainResult(version, mdir, metrics)
