"""The training process's allocator settings: a step's freed blocks are reused, not faulted in anew."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from training.memory import _glibc

# One training step of the attention history encoder at batch 512 x 50 items x 64 (forward and
# backward through a 20k-row table), 20 times after a warm-up: the page faults per step.
_PROBE = r"""
import json, resource, sys
import torch
from towers.model import AttentionHistory
from training.memory import reuse_freed_blocks
applied = reuse_freed_blocks() if sys.argv[1] == "on" else None
torch.set_num_threads(1)
torch.manual_seed(0)
enc = AttentionHistory(64, 50, 3)
table = torch.nn.Parameter(torch.randn(20_000, 64) * 0.05)
rows = torch.randint(1, 20_000, (512, 50))
def steps(n):
    for _ in range(n):
        table.grad = None
        enc(table, rows).pow(2).sum().backward()
steps(3)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
steps(20)
print(json.dumps({"applied": applied, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 20}))
"""


def _faults_per_step(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_glibc() is None, reason="the settings are glibc's (mallopt)")
def test_reused_blocks_do_not_fault_in_new_pages_every_step() -> None:
    block = 512 * 50 * 64 * 4 // 4096  # one (512, 50, 64) float block: 1,600 pages of 4 KiB
    before = _faults_per_step("off")
    after = _faults_per_step("on")
    assert after["applied"] is True
    # glibc's default hands such blocks back and faults them in again, page by page, every step
    # (the probe shows it without the settings, so this test cannot pass by a quiet default)
    assert before["faults"] > block / 2, before
    assert after["faults"] < block / 4, after
