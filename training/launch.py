"""``twotower train --nproc N``: the same command under ``torchrun --standalone --nproc-per-node N``.

torchrun starts the N processes, gives each its rank and a rendezvous on this machine, and stops
them all as soon as one fails (its report names the rank and how it died). This wrapper only adds
what to do next: the version to resume. Several machines: run torchrun yourself (README).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from towers.schema import DataError


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
            continue
        if tok == "--nproc":
            skip = True
            continue
        if tok.startswith("--nproc="):
            continue
        out.append(tok)
    return out


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """``python -m torch.distributed.run ... -m twotower.cli <argv without --nproc>``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "twotower.cli", *_without_nproc(argv)]


def launch(nproc: int, cfg: Any, argv: list[str]) -> int:
    from towers.artifacts import MODELS_DIR, new_version, versions

    started = new_version()  # versions sort by time: the job's own version sorts after this name
    rc = subprocess.run(torchrun_command(nproc, argv)).returncode
    if rc == 0:
        return 0
    models = Path(cfg.artifacts) / MODELS_DIR
    if cfg.resume:
        from training.train import resolve_resume_dir

        try:
            mine = [resolve_resume_dir(cfg.artifacts, cfg.resume).name]
        except DataError:
            mine = []
    else:
        mine = [v for v in versions(models, containing="last.pt") if v > started]
    if mine:
        hint = (f"continue from its last completed epoch with: twotower train --nproc {nproc} "
                f"--artifacts {cfg.artifacts} --resume {mine[-1]}")
    else:
        hint = f"it completed no epoch under {models}: nothing to resume"
    print(f"twotower train: error: training on {nproc} processes failed (exit status {rc}; torchrun's "
          f"report above names the rank that failed); {hint}", file=sys.stderr)
    return 1
