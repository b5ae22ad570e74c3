"""Data-parallel training (torchrun, gloo) computes what one process computes.

- step level: 2 ranks, each with half of a global batch, give the loss and the gradients one process
  gets on the concatenated batch (float tolerance), and end every step with identical parameters;
- job level: `twotower train --nproc 2` interrupted after an epoch and resumed ends bit for bit where
  an uninterrupted 2-process run ends; a rank killed mid-epoch fails the whole job with a message
  that says how to resume, and the resumed job again ends where the uninterrupted one does.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from tests.reliability.harness import REPO_ROOT, wait_until
from training.config import TrainConfig
from training.distributed import Dist
from training.pipeline import batch_tensors, part_of
from training.train import batch_loss, build_model, prepare_data, start_run

STEPS = 3
WORLD = 2


def _cfg(artifacts: Path, **kw: Any) -> TrainConfig:
    base = dict(data="synthetic", data_options={"size": "tiny", "seed": 0}, dim=16, hidden=(32,), feature_dim=8,
                history_len=5, user_id_dropout=0.0, num_threads=1, quiet=True, seed=7, artifacts=str(artifacts))
    base.update(kw)
    return TrainConfig(**base)


def _global_batches(user_rows: np.ndarray, batch: int) -> list[np.ndarray]:
    """Global batches whose r-th half holds examples of rank r's users, as under DDP (each rank owns
    its users; its history mask knows only them)."""
    rng = np.random.default_rng(11)
    owner = part_of(user_rows, WORLD)
    half = batch // WORLD
    return [np.concatenate([rng.choice(np.flatnonzero(owner == r), size=half, replace=False) for r in range(WORLD)])
            for _ in range(STEPS)]


def _named(built: Any) -> dict[str, torch.Tensor]:
    """Every parameter by name; a tied table appears once."""
    out, seen = {}, set()
    for side in ("user_tower", "item_tower"):
        for name, p in getattr(built.model, side).named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out[f"{side}.{name}"] = p
    return out


def _grad(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None
    return (p.grad.to_dense() if p.grad.is_sparse else p.grad).detach().clone()


def _train_steps(cfg: TrainConfig, dist: Dist, batches: list[np.ndarray]) -> dict[str, Any]:
    """STEPS optimiser steps on this rank's share of each global batch; the loss of the whole batch
    and every gradient after the step's reduction, then the parameters."""
    prep = prepare_data(cfg, dist, start_run(cfg, dist))
    built = build_model(cfg, prep, "test", torch.device("cpu"), dist)
    params = _named(built)
    losses, grads = [], []
    for step, idx in enumerate(batches):
        b = len(idx) // dist.world
        batch = batch_tensors(prep.batches.ex, idx[dist.rank * b:(dist.rank + 1) * b])
        gen_neg = torch.Generator().manual_seed(1000 + step)  # the same pool on every rank
        loss = batch_loss(cfg, built, dist, batch, gen_neg, torch.Generator().manual_seed(step))
        built.optimizers.zero_grad()
        loss.backward()
        dist.average_table_grads(built.optimizers.table_params)
        losses.append(float(dist.sum(loss.detach())) / dist.world)
        grads.append({k: _grad(p) for k, p in params.items()})
        built.optimizers.step()
    return {"loss": losses, "grads": grads, "params": {k: p.detach().clone() for k, p in params.items()},
            "full_items": built.full_items, "user_rows": prep.batches.ex.user_rows}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, port: int, cfg: dict[str, Any], batches: list[np.ndarray], out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist = Dist.from_env("cpu")
    try:
        res = _train_steps(TrainConfig.from_dict(cfg), dist, batches)
        # as the training job does: no rank tears its group down while the other may still be
        # finishing the last collective (one full-suite run saw a rank abort in gloo's teardown)
        dist.barrier()
    finally:
        dist.close()
    torch.save(res, Path(out) / f"rank{rank}.pt")


@pytest.mark.parametrize("kw", [
    # 120 items, 16 + 32 candidates a step: item vectors are embedded per rank and gathered
    {"negatives": "mixed", "batch_size": 16, "num_negatives": 32},
    # the hard sampler with history masking on the same gathered path
    {"negatives": "hard", "batch_size": 16, "num_negatives": 32, "hard_negatives": 8},
    # 128 in-batch candidates >= 121 item rows: every rank embeds the whole catalogue
    {"negatives": "inbatch", "batch_size": 128},
    # the item table started from the transitions graph: every rank must start from the same one
    # (DDP does not broadcast the id tables)
    {"negatives": "mixed", "batch_size": 16, "num_negatives": 32, "item_init": "transitions"},
], ids=["mixed-gathered", "hard-gathered", "inbatch-full-catalogue", "mixed-item-init-transitions"])
def test_two_ranks_compute_what_one_process_computes_on_the_whole_batch(tmp_path: Path, kw: dict[str, Any]) -> None:
    cfg = _cfg(tmp_path / "art", **kw)
    one = _train_steps(cfg, Dist(), [])  # sizes only
    batches = _global_batches(one["user_rows"], cfg.batch_size)
    one = _train_steps(cfg, Dist(), batches)
    mp.start_processes(_rank_main, args=(_free_port(), cfg.to_dict(), batches, str(tmp_path)), nprocs=WORLD,
                       join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert one["full_items"] == ranks[0]["full_items"] == (kw["negatives"] == "inbatch")

    for step in range(STEPS):
        assert ranks[0]["loss"][step] == pytest.approx(one["loss"][step], rel=1e-5, abs=1e-6), step
        for name, g in one["grads"][step].items():
            for r in range(WORLD):
                torch.testing.assert_close(ranks[r]["grads"][step][name], g, rtol=1e-4, atol=1e-5,
                                           msg=lambda m, n=name, s=step, r=r: f"step {s} rank {r} grad {n}: {m}")
    for name, p in one["params"].items():
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), f"ranks differ on {name}"
        torch.testing.assert_close(ranks[0]["params"][name], p, rtol=1e-4, atol=1e-5)
    # the id tables moved (the test would pass vacuously if no gradient reached them)
    assert not torch.equal(one["params"]["user_tower.hist_emb.weight"],
                           _train_steps(cfg, Dist(), [])["params"]["user_tower.hist_emb.weight"])


# ---------------------------------------------------------------- whole jobs under torchrun

CLI = ["--data", "synthetic", "--synthetic-size", "tiny", "--dim", "16", "--hidden", "32", "--history-len", "5",
       "--epochs", "3", "--batch-size", "64", "--num-negatives", "32", "--seed", "5", "--threads", "1",
       "--patience", "10", "--quiet"]


def _train(art: Path, *extra: str, wait: bool = True) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "twotower.cli", "--log-level", "WARNING", "train", "--nproc",
                             str(WORLD), *CLI, "--artifacts", str(art), *extra], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if wait:
        proc.wait(timeout=600)
    return proc


def _weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    return {f"{side}.{k}": v for side in ("user_tower", "item_tower") for k, v in state[side].items()}


def _assert_same_run(a: Path, b: Path) -> None:
    for name in ("model.pt", "last.pt"):
        wa, wb = _weights(a / name), _weights(b / name)
        assert wa.keys() == wb.keys()
        assert [k for k in wa if not torch.equal(wa[k], wb[k])] == [], name
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert [(e["epoch"], e["loss"], e["valid_hr"]) for e in ma["epochs"]] == \
        [(e["epoch"], e["loss"], e["valid_hr"]) for e in mb["epochs"]]
    untimed = [{k: v for k, v in m["test"].items() if k != "seconds"} for m in (ma, mb)]
    assert untimed[0] == untimed[1] and ma["ranks"] == mb["ranks"] == WORLD


def _version(art: Path) -> Path:
    return next(p for p in (art / "models").iterdir() if p.is_dir())


@pytest.mark.slow
def test_resume_and_a_dead_rank_under_torchrun_end_where_an_uninterrupted_run_ends(tmp_path: Path) -> None:
    whole = _train(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr.read().decode()[-2000:] if whole.stderr else ""
    ref = _version(tmp_path / "whole")
    assert (tmp_path / "whole" / "models" / "LATEST").read_text().strip() == ref.name

    # stopped cleanly after epoch 1, resumed
    art = tmp_path / "stopped"
    first = _train(art, "--stop-after-epoch", "1")
    assert first.returncode == 0, first.stderr.read().decode()[-2000:] if first.stderr else ""
    assert not (art / "models" / "LATEST").exists()
    again = _train(art, "--resume", "latest")
    assert again.returncode == 0, again.stderr.read().decode()[-2000:] if again.stderr else ""
    _assert_same_run(ref, _version(art))

    # rank 1 killed in the middle of epoch 2: the job fails, saying how to go on; resuming finishes it
    art = tmp_path / "killed"
    proc = _train(art, "--pause-at", "2:1", wait=False)
    try:
        paused = [wait_until(lambda r=r: next(iter((art / "models").glob(f"*/paused-{r}")), None), 300,
                             f"rank {r} pausing in epoch 2") for r in range(WORLD)]
        os.kill(int(paused[1].read_text().split()[1]), signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert proc.returncode != 0
    mdir = paused[0].parent
    assert f"--resume {mdir.name}" in err, err[-2000:]
    assert not (art / "models" / "LATEST").exists()
    resumed = _train(art, "--resume", mdir.name)
    assert resumed.returncode == 0, resumed.stderr.read().decode()[-2000:] if resumed.stderr else ""
    _assert_same_run(ref, mdir)


@pytest.mark.slow
def test_streamed_part_files_train_on_two_ranks_each_reading_its_own_shards(tmp_path: Path) -> None:
    from training.synthetic import write_synthetic_parts

    write_synthetic_parts(tmp_path / "parts", seed=1, n_users=400, n_items=150, n_clusters=4,
                          interactions_per_user=10, chunk_users=150)
    art = tmp_path / "art"
    proc = subprocess.run([sys.executable, "-m", "twotower.cli", "--log-level", "WARNING", "train", "--nproc",
                           str(WORLD), "--data", f"csv:{tmp_path / 'parts'}", "--shard-rows", "1000", "--dim", "16",
                           "--hidden", "32", "--epochs", "2", "--batch-size", "64", "--num-negatives", "32",
                           "--threads", "1", "--quiet", "--artifacts", str(art)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mdir = _version(art)
    metrics = json.loads((mdir / "metrics.json").read_text())
    dataset = json.loads((mdir / "config.json").read_text())["dataset"]
    assert metrics["ranks"] == WORLD and len(metrics["peak_rss_mb_per_rank"]) == WORLD
    assert dataset["shards"] % WORLD == 0 and dataset["shards"] >= 4  # ~4000 rows / 1000 per shard
    assert metrics["test"]["masked"]["HR@50"] > 0 and metrics["test"]["n_users"] == dataset["eval_users"] > 0
    assert not (mdir / "stream").exists()
