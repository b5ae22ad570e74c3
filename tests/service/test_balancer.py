"""The worker supervisor (service.balancer) with a worker program that fails on purpose; balancing,
restarts and draining are tested end to end, with real workers, in test_server.py."""

from __future__ import annotations

import logging
import socket
import sys

from service.balancer import Supervisor


def test_workers_that_fail_to_start_stop_the_supervisor_with_their_exit_code(free_port, caplog):
    sup = Supervisor("127.0.0.1", free_port, 2, graceful_timeout_s=1.0,
                     worker_cmd=(sys.executable, "-c", "import sys; sys.exit(3)"))
    with caplog.at_level(logging.INFO, logger="service.balancer"):
        assert sup.run() == 3
    started = [r for r in caplog.records if "started (pid" in r.getMessage()]
    assert len(started) == 2, "kept restarting workers that never started"
    assert not any("starting another" in r.getMessage() for r in caplog.records)
    assert not sup.workers or all(w.proc.poll() is not None for w in sup.workers.values())
    with socket.create_server(("127.0.0.1", free_port)):  # the port is given back
        pass

