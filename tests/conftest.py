"""Fixtures shared by every test package.

Redis: the suite talks to a real Redis over TCP. ``make test`` (and so ``.ci/run``) starts one when
none answers, so a missing Redis is a broken setup and the fixtures FAIL loudly instead of skipping.
Tests never FLUSHALL/FLUSHDB: each gets its own key prefix and only keys under it are deleted.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import redis

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout's root directory (where pyproject.toml is)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of a Redis that answers PING; fails the test (never skips) when there is none.

    TT_REDIS_URL wins; an empty TT_REDIS_URL means "no Redis" to the service, but the tests need a
    real one, so it falls back to the default local URL.
    """
    import redis

    url = os.environ.get("TT_REDIS_URL") or DEFAULT_REDIS_URL
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(
            f"no Redis answers at {url} ({exc}). Run the suite with `make test`, which starts one, "
            "or start redis-server / set TT_REDIS_URL.",
            pytrace=False,
        )
    finally:
        client.close()
    return url


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix unique to this test, e.g. ``tt-test-3f2a9c1d``; its keys are deleted afterwards.

    Pass it as TT_REDIS_PREFIX (or the cache's prefix argument) so the test's keys never collide
    with another test, a parallel run, or a developer's running service.
    """
    import redis

    prefix = f"tt-test-{uuid.uuid4().hex[:8]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        # SCAN, not KEYS: never block a shared server; delete only this test's namespace
        batch = [key for key in client.scan_iter(match=f"{prefix}*", count=500)]
        for i in range(0, len(batch), 500):
            client.delete(*batch[i:i + 500])
    finally:
        client.close()


@pytest.fixture
def redis_client(redis_url: str, redis_prefix: str) -> Iterator[redis.Redis]:
    """A connected ``redis.Redis`` (bytes responses). Write only keys starting with ``redis_prefix``."""
    import redis as redis_lib

    client = redis_lib.Redis.from_url(redis_url)
    yield client
    client.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a uvicorn or redis subprocess)."""
    return _free_port()


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real 3-node Redis Cluster (3 primaries, no replicas) on free ports, for this test session:
    ``redis-server --cluster-enabled yes`` three times, then ``redis-cli --cluster create``. Yields
    the URL of the first node (the service finds the others from it); the nodes are killed at the end."""
    import shutil
    import subprocess
    import time

    import redis

    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        pytest.fail("redis-server and redis-cli are needed for the Redis Cluster tests "
                    "(Debian: apt-get install redis-server)", pytrace=False)
    base = tmp_path_factory.mktemp("redis-cluster")
    ports = [_free_port() for _ in range(3)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            d = base / str(port)
            d.mkdir()
            # the cluster bus gets a free port of its own (the default, port + 10000, may be taken or > 65535)
            procs.append(subprocess.Popen(
                [server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-port", str(_free_port()), "--cluster-config-file", str(d / "nodes.conf"),
                 "--cluster-node-timeout", "2000", "--save", "", "--appendonly", "no", "--dir", str(d)],
                stdout=subprocess.DEVNULL, stderr=(d / "log").open("wb")))
        clients = [redis.Redis(port=p, socket_connect_timeout=1, socket_timeout=2) for p in ports]
        deadline = time.monotonic() + 20
        for c in clients:
            while True:
                try:
                    c.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                        pytest.fail(f"a cluster node did not start; see {base}", pytrace=False)
                    time.sleep(0.05)
        made = subprocess.run([cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
                               "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True, timeout=60)
        if made.returncode != 0:
            pytest.fail(f"redis-cli --cluster create failed:\n{made.stdout}{made.stderr}", pytrace=False)
        deadline = time.monotonic() + 30
        while not all(c.cluster("info").get("cluster_state") == "ok" for c in clients):
            if time.monotonic() > deadline:
                pytest.fail("the Redis Cluster did not reach cluster_state:ok in 30 s", pytrace=False)
            time.sleep(0.1)
        for c in clients:
            c.close()
        yield f"redis://127.0.0.1:{ports[0]}/0"
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait(timeout=10)
