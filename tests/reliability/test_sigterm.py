"""SIGTERM while requests are in flight: every one of them is answered in full, new connections are
refused at once (nothing half-accepted), and the process exits by itself.

To know that requests really are in flight when the signal lands, the test holds them inside the
server: its private Redis is paused (SIGSTOP) and the Redis timeout is long, so every recall waits
on its cache lookup. The signal goes out once every request has been sent in full (httpcore's
trace) and read by the server (no unread byte on any of its connections, from /proc); then Redis
is resumed and they finish.
"""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.reliability.harness import Load, RedisProc, Req, ServerProc, port_open, server_sockets, wait_until

pytestmark = pytest.mark.slow

IN_FLIGHT = 24


def _read_by_server(srv: ServerProc) -> bool:
    unread = server_sockets(srv.pid, srv.port)
    return len(unread) == IN_FLIGHT and not any(unread)


def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(artifacts: Path, private_redis: RedisProc,
                                                                  prefix: str, tmp_path: Path) -> None:
    env = {"TT_REDIS_TIMEOUT_S": "8", "TT_GRACEFUL_TIMEOUT_S": "30", "TT_RELOAD_POLL_S": "0"}
    srv = ServerProc(artifacts, tmp_path / "server.log", redis_url=private_redis.url, prefix=prefix, env=env)
    srv.start()
    try:
        # warm: the user tower and the index have answered once
        assert httpx.post(f"{srv.url}/v1/recall", json={"user_id": 1, "k": 5}, timeout=30).status_code == 200
        private_redis.pause()
        try:
            load = Load(srv.url, lambda i: ("recall", Req("POST", "/v1/recall", {"user_id": i + 2, "k": 50})),
                        concurrency=IN_FLIGHT, max_requests=IN_FLIGHT, max_seconds=120, timeout=120).start()
            # every request has been sent in full and read by the server (its connection holds no
            # unread byte): it is in the app, waiting on Redis
            wait_until(lambda: load.delivered == IN_FLIGHT and _read_by_server(srv), 60,
                       "every request sent and read by the server")
            assert load.sent == IN_FLIGHT and not load.outcomes, "requests finished while Redis was paused"
            srv.terminate()
            # the listening socket closes first: a new connection is refused, not queued or reset later
            wait_until(lambda: not port_open(srv.port), 60, "the listener closing after SIGTERM")
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", srv.port), timeout=2).close()
            with pytest.raises(httpx.ConnectError):
                httpx.post(f"{srv.url}/v1/recall", json={"user_id": 1}, timeout=2)
            assert srv.proc is not None and srv.proc.poll() is None, "exited with requests in flight"
            assert not load.outcomes, "in-flight requests were cut short by the signal"
        finally:
            private_redis.resume()
        load.join()
        assert srv.proc is not None
        # uvicorn re-raises the signal after a graceful shutdown: "killed by SIGTERM" is the clean exit
        rc = srv.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError("the server did not exit after its in-flight requests finished") from None
    finally:
        srv.kill()
    assert load.counts == {"200": IN_FLIGHT}, (load.counts, [o.error or o.body_4xx for o in load.outcomes][:3])
    assert all(len(o.versions) == 1 for o in load.outcomes)
    assert rc in (0, -signal.SIGTERM), rc
    log = srv.log_text()
    assert "Traceback" not in log and '"level": "ERROR"' not in log, log[-2000:]
