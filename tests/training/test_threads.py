"""The training job's thread count follows the cores other processes leave free, not its own work."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from training.train import busy_elsewhere, idle_cores


def test_the_process_own_cpu_time_is_not_counted_as_someone_elses():
    # 2 cores over 1 s = 200 ticks; 100 busy ticks is one core's worth
    assert busy_elsewhere(100, 200, own_cpu_s=1.0, window_s=1.0, cores=2) == pytest.approx(0.0)  # all ours
    assert busy_elsewhere(100, 200, own_cpu_s=0.0, window_s=1.0, cores=2) == pytest.approx(1.0)  # all theirs
    assert busy_elsewhere(150, 200, own_cpu_s=0.5, window_s=1.0, cores=2) == pytest.approx(1.0)
    assert busy_elsewhere(0, 0, own_cpu_s=0.0, window_s=0.0, cores=2) == 0.0  # no ticks: nothing known busy


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs a core to leave free")
def test_a_core_another_process_keeps_busy_is_left_to_it():
    spin = subprocess.Popen([sys.executable, "-c", "print('spinning', flush=True)\nwhile True: pass"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert spin.stdout is not None and spin.stdout.readline().strip() == "spinning"
        assert idle_cores(window_s=0.5) <= (os.cpu_count() or 1) - 1
    finally:
        spin.kill()
        spin.wait()
