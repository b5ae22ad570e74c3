"""A training process killed with SIGKILL (no chance to clean up) and resumed from its checkpoint ends
exactly where an uninterrupted run with the same seed ends: bit-identical weights and the same
per-epoch losses and validation scores.

The kill lands at a known point, never at a moment picked by the clock: the victim runs with the
``--pause-at EPOCH:STEP`` hook, which stops it after that step (mid-epoch) and writes
``paused-0`` into its version directory; the test waits for that file, then kills it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.reliability.conftest import train_tiny
from tests.reliability.harness import REPO_ROOT, wait_until

pytestmark = pytest.mark.slow

SEED, EPOCHS = 3, 3
PAUSE = (2, 1)  # the victim stops after step 1 of epoch 2: epoch 1 is saved, epoch 2 is half done
# what the uninterrupted run below gets through its config, spelled as CLI flags
CLI = ["--data", "synthetic", "--synthetic-size", "tiny", "--data-seed", "0", "--dim", "16", "--hidden", "32",
       "--history-len", "10", "--epochs", str(EPOCHS), "--batch-size", "256", "--num-negatives", "64",
       "--hard-negatives", "8", "--temperature", "0.05", "--seed", str(SEED), "--threads", "1", "--patience", "10",
       "--quiet"]
RUNTIME = {"artifacts", "device", "quiet", "num_threads", "stop_after_epoch", "resume", "pause_at"}


def _state(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    payload = payload.get("model", payload)  # last.pt nests the checkpoint under "model"
    return {"user": payload["user_tower"], "item": payload["item_tower"]}


def _same_weights(a: Path, b: Path) -> list[str]:
    sa, sb = _state(a), _state(b)
    diffs = []
    for tower in ("user", "item"):
        assert sa[tower].keys() == sb[tower].keys()
        diffs += [f"{tower}.{k}" for k in sa[tower] if not torch.equal(sa[tower][k], sb[tower][k])]
    return diffs


def _no_timings(d: object) -> object:
    """Metrics without wall-clock fields (those differ between any two runs)."""
    if isinstance(d, dict):
        return {k: _no_timings(v) for k, v in d.items() if k not in ("seconds", "wall_time_s", "train_s", "eval_s")}
    return d


def _epoch(last_pt: Path) -> int:
    return int(torch.load(last_pt, map_location="cpu", weights_only=True)["epoch"])


def test_sigkill_mid_training_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    # the reference: one uninterrupted run, in this process
    ref = train_tiny(tmp_path / "ref", seed=SEED, epochs=EPOCHS, patience=10)

    # the victim: `twotower train` in its own process, paused in the middle of epoch 2, then killed
    art = tmp_path / "victim"
    proc = subprocess.Popen([sys.executable, "-m", "twotower.cli", "--log-level", "WARNING", "train", *CLI,
                             "--artifacts", str(art), "--pause-at", f"{PAUSE[0]}:{PAUSE[1]}"], cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        paused = wait_until(lambda: next(iter((art / "models").glob("*/paused-0")), None), 180,
                            f"the victim pausing after epoch {PAUSE[0]} step {PAUSE[1]}")
        assert proc.poll() is None, "the victim exited instead of pausing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-1000:] if proc.stderr else ""
    mdir = paused.parent
    assert paused.read_text().split()[0] == f"{PAUSE[0]}:{PAUSE[1]}"
    killed_at = _epoch(mdir / "last.pt")
    assert killed_at == PAUSE[0] - 1, "last.pt must hold the last epoch finished before the kill"
    assert not (art / "models" / "LATEST").exists(), "an interrupted run must not be published as LATEST"

    # the same job, resumed from the checkpoint in its directory
    res = train_tiny(art, seed=SEED, epochs=EPOCHS, resume=mdir.name)
    assert res.model_version == mdir.name
    assert (art / "models" / "LATEST").read_text().strip() == mdir.name

    saved_ref = json.loads((ref.dir / "config.json").read_text())["train"]
    saved_res = json.loads((mdir / "config.json").read_text())["train"]
    assert {k: v for k, v in saved_ref.items() if k not in RUNTIME} == \
        {k: v for k, v in saved_res.items() if k not in RUNTIME}, "the two runs were not configured alike"
    assert _same_weights(ref.dir / "model.pt", mdir / "model.pt") == []
    assert _same_weights(ref.dir / "last.pt", mdir / "last.pt") == []
    a, b = ref.metrics["epochs"], res.metrics["epochs"]
    assert [(e["epoch"], e["loss"], e["valid_hr"]) for e in a] == [(e["epoch"], e["loss"], e["valid_hr"]) for e in b]
    assert ref.metrics["best_epoch"] == res.metrics["best_epoch"]
    assert _no_timings(ref.metrics["test"]) == _no_timings(res.metrics["test"])
    assert res.metrics["resumed_from_epoch"] == killed_at
