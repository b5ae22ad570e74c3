"""Redis killed, restarted and hung while a real server is under load: every request is answered
(200, never a 5xx or a dropped connection), answers are computed uncached while Redis is away,
caching resumes once it is back, and every key the service wrote lives under its prefix."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.reliability.harness import Load, Outcome, RedisProc, Req, ServerProc, wait_until

pytestmark = pytest.mark.slow


def recall_mix(i: int) -> tuple[str, Req]:
    # 40 distinct users so most requests repeat one that is cached (when the cache works), and a
    # stream of never-seen users whose misses always reach Redis (so the server notices a fault
    # even while the in-process cache answers the repeats)
    if i % 10 == 5:
        return "new-user", Req("POST", "/v1/recall", {"user_id": f"u-{i}", "k": 10})
    if i % 10 == 9:
        return "batch", Req("POST", "/v1/recall/batch",
                            {"requests": [{"user_id": (i + j) % 40 + 1, "k": 10} for j in range(3)]})
    return "recall", Req("POST", "/v1/recall", {"user_id": i % 40 + 1, "k": 10})


def _answers(load: Load, after: float, before: float = float("inf")) -> list[Outcome]:
    return [o for o in list(load.outcomes) if o.status == 200 and after < o.t0 and o.t1 < before]


def _cached(outs: list[Outcome]) -> int:
    return sum(1 for o in outs for (_m, _i, c) in o.versions if c)


HUNG_ANSWERS = 150


def _load(srv: ServerProc) -> Load:
    return Load(srv.url, recall_mix, concurrency=8, max_requests=1_000_000, max_seconds=900)


def _mget_calls(redis: RedisProc) -> int:
    """MGET commands the Redis server has run: each is one cache lookup of the service."""
    client = redis.client()
    try:
        return int(client.info("commandstats").get("cmdstat_mget", {}).get("calls", 0))
    finally:
        client.close()


def test_redis_killed_hung_and_restarted_under_load(artifacts: Path, private_redis: RedisProc, prefix: str,
                                                    tmp_path: Path, record_property) -> None:
    env = {"TT_REDIS_RETRY_S": "0.1", "TT_REDIS_RETRY_MAX_S": "0.4", "TT_REDIS_TIMEOUT_S": "0.25",
           "TT_RELOAD_POLL_S": "0"}
    srv = ServerProc(artifacts, tmp_path / "server.log", redis_url=private_redis.url, prefix=prefix, env=env)
    # counts, not clocks: every wait is a condition with a generous deadline, and each load runs
    # until it is stopped
    with srv:
        with _load(srv) as load:
            t_start = time.monotonic()
            wait_until(lambda: _cached(_answers(load, t_start)) >= 30, 60, "cached answers before any fault")

            # 1. crash: SIGKILL, no goodbye. Until the server notices (a Redis call fails), it may
            # still answer from its in-process cache; from then on every answer is computed.
            private_redis.kill()
            wait_until(lambda: srv.readyz()["redis"] == "down", 60, "readiness reporting redis down")
            t_killed = time.monotonic()
            assert srv.readyz()["status"] == "degraded"
            wait_until(lambda: len(_answers(load, t_killed)) >= 60, 60, "answers while redis is dead")

            # 2. restart on the same port: empty (no persistence), the breaker closes by itself
            t_restart = time.monotonic()
            private_redis.start()
            wait_until(lambda: srv.readyz()["status"] == "ready", 60, "readiness after redis came back")
            t_back = time.monotonic()
            wait_until(lambda: _cached(_answers(load, t_back)) >= 30, 60, "cached answers after the restart")

        # 3. hang: SIGSTOP keeps the sockets open but nothing answers; the 0.25 s timeout and the
        # breaker keep requests moving. Commands sent meanwhile wait, unread, in the paused server's
        # sockets, and it runs them once resumed: its MGET count tells how many cache lookups went
        # to the hung Redis instead of being skipped. No load runs while it is read.
        lookups_before = _mget_calls(private_redis)
        private_redis.pause()
        try:
            with _load(srv) as hang:
                t_paused = time.monotonic()
                # until the server notices (a lookup times out) it may answer from its in-process cache
                wait_until(lambda: srv.readyz()["redis"] == "down", 60, "readiness reporting a hung redis down")
                t_down = time.monotonic()
                wait_until(lambda: len(_answers(hang, t_down)) >= HUNG_ANSWERS, 120, "answers while redis hangs")
            t_resumed = time.monotonic()  # the load has stopped: its last requests finished during the hang
        finally:
            private_redis.resume()
        wait_until(lambda: srv.readyz()["status"] == "ready", 60, "readiness after redis resumed")
        lookups_in_hang = _mget_calls(private_redis) - lookups_before

        with _load(srv) as after:
            after.wait_for(lambda ld: _cached(_answers(ld, 0)) >= 10, 60, "cached answers after the hang")

    s = load.summary()
    record_property("load", s)
    hung = _answers(hang, t_down)
    print("redis faults under load:", s, f"lookups sent to the hung redis: {lookups_in_hang} "
          f"for {len(hung)} answers")
    for ld in (load, hang, after):
        assert ld.transport_errors() == 0, ld.errors()
        assert ld.server_errors() == 0, ld.errors()
        assert ld.errors() == {}, ld.errors()
    # while Redis was dead every answer was computed, none came from the cache
    dead = _answers(load, t_killed, t_restart)
    assert len(dead) >= 50 and _cached(dead) == 0
    assert len(hung) >= HUNG_ANSWERS and _cached(hung) == 0
    # a hung Redis costs at most a timeout per breaker probe, not one per request: the lookups that
    # reached it are those of the first requests (8 at a time, up to 3 lookups each) before the
    # breaker opened, plus one per probe (the backoff starts at 0.1 s and doubles to 0.4 s), however
    # long the hang lasted on a busy machine; without the breaker each of the >= HUNG_ANSWERS
    # requests would have sent its own
    probes = 3 + (t_resumed - t_paused) / 0.4
    assert lookups_in_hang <= 8 * 3 + probes, (lookups_in_hang, probes, len(hung))
    assert lookups_in_hang < len(hung), (lookups_in_hang, len(hung))
    # every answer names the one bundle being served
    pairs = load.pairs() | hang.pairs() | after.pairs()
    assert len(pairs) == 1, pairs

    # every key the service wrote is in its namespace (SCAN the private server: nothing else uses it)
    client = private_redis.client()
    try:
        keys = [k.decode() for k in client.scan_iter(count=1000)]
    finally:
        client.close()
    assert keys, "the restarted redis holds no cache entries: caching did not resume"
    assert all(k.startswith(f"{prefix}:") for k in keys), [k for k in keys if not k.startswith(prefix)][:5]
