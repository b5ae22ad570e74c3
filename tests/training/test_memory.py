"""The training process's allocator settings: a step's freed blocks are reused, not faulted in anew."""

from __future__ import annotations

import importlib.util
from types import ModuleType

import pytest

from tests.reliability.harness import REPO_ROOT
from training.memory import _glibc


def _interests_benchmark() -> ModuleType:
    """benchmarks/interests.py, whose encoder probe (one attention-encoder step at batch 512 x 50
    items x 64, forward and backward, in a process of its own) this test runs."""
    spec = importlib.util.spec_from_file_location("tt_benchmarks_interests", REPO_ROOT / "benchmarks" / "interests.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(_glibc() is None, reason="the settings are glibc's (mallopt)")
def test_reused_blocks_do_not_fault_in_new_pages_every_step() -> None:
    bench = _interests_benchmark()
    block = 512 * 50 * 64 * 4 // 4096  # one (512, 50, 64) float block: 1,600 pages of 4 KiB
    before = bench.encoder_step("shipped", "default", 20)
    after = bench.encoder_step("shipped", "reuse", 20)
    assert after["applied"] is True
    # glibc's default hands such blocks back and faults them in again, page by page, every step
    # (the probe shows it without the settings, so this test cannot pass by a quiet default)
    assert before["faults"] > block / 2, before
    assert after["faults"] < block / 4, after
