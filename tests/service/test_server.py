"""End to end through a real uvicorn process: train on synthetic data, reindex, serve, recall, post an
event, see the next recall change, reindex again, see the new version served; then SIGTERM under load,
and several workers sharing a burst of keep-alive connections evenly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.reliability.harness import process_tree
from tests.service.conftest import wait_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """artifacts/ with a model trained for one epoch on tiny synthetic data and its first bundle."""
    from index.reindex import ReindexConfig
    from index.reindex import run as reindex
    from training.config import TrainConfig
    from training.train import run as train

    art = tmp_path_factory.mktemp("artifacts")
    train(TrainConfig(data="synthetic", data_options={"size": "tiny"}, artifacts=str(art), dim=32, hidden=(64,),
                      epochs=1, num_negatives=64, batch_size=512, quiet=True, num_threads=2))
    reindex(ReindexConfig(artifacts=art, n_eval_users=50, threads=2))
    return art


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_lines(self) -> list[dict]:
        out = []
        for line in self.log.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out


def start_server(artifacts: Path, port: int, redis_url: str, prefix: str, log: Path,
                 launcher: tuple[str, ...] = (sys.executable, "-m", "twotower.cli"), **env: str) -> Server:
    e = dict(os.environ, TT_REDIS_PREFIX=prefix, TT_RELOAD_POLL_S="0.2", TT_LOG_LEVEL="INFO", **env)
    proc = subprocess.Popen([*launcher, "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--artifacts", str(artifacts), "--redis-url", redis_url],
                            env=e, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    srv = Server(proc, port, log)
    try:
        wait_port(port, timeout=120)
        deadline = time.monotonic() + 120
        while not _ready(srv.url):
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.1)
    except BaseException:
        proc.kill()
        raise
    return srv


def _ready(url: str) -> bool:
    # a server still loading may hold the connection (workers not up yet): that is "not ready yet"
    try:
        return httpx.get(f"{url}/readyz", timeout=30).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def server(trained, free_port, redis_url, redis_prefix, tmp_path) -> Iterator[Server]:
    srv = start_server(trained, free_port, redis_url, redis_prefix, tmp_path / "server.log")
    yield srv
    if srv.proc.poll() is None:
        srv.proc.terminate()
        try:
            srv.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            srv.proc.kill()


def _a_known_user(artifacts: Path) -> str:
    bundle = (artifacts / "bundles" / (artifacts / "bundles" / "CURRENT").read_text().strip())
    return next(iter(json.loads((bundle / "user_items.json").read_text())))


def test_the_service_runs_without_torch_pandas_or_pyarrow(trained, free_port, redis_url, redis_prefix, tmp_path):
    """What the api image carries is enough: a server that cannot import torch, pandas or pyarrow loads
    the bundle (its user_tower.npz, JSON user tables) and gives byte for byte the answers of a server
    with everything installed, and no torch library is mapped into it."""
    from tests.conftest import _free_port

    bare = start_server(trained, free_port, redis_url, f"{redis_prefix}-bare", tmp_path / "bare.log",
                        launcher=(sys.executable, str(Path(__file__).parent / "without_jobs_deps.py"), "twotower.cli"),
                        TT_CACHE_TTL_S="0")
    full = start_server(trained, _free_port(), redis_url, f"{redis_prefix}-full", tmp_path / "full.log",
                        TT_CACHE_TTL_S="0")
    try:
        maps = "\n".join(Path(f"/proc/{pid}/maps").read_text() for pid in process_tree(bare.proc.pid)
                         if Path(f"/proc/{pid}/maps").exists())
        assert "libtorch" not in maps and "pyarrow" not in maps
        user = _a_known_user(trained)
        bodies = [{"user_id": user, "k": 10}, {"history": [1, 2, 3], "k": 5}, {"features": {"age": 30}, "k": 5},
                  {"user_id": "nobody", "k": 3}]
        for body in bodies:
            a, b = httpx.post(f"{bare.url}/v1/recall", json=body), httpx.post(f"{full.url}/v1/recall", json=body)
            assert (a.status_code, a.content) == (b.status_code, b.content) == (200, b.content), body
        a, b = httpx.get(f"{bare.url}/v1/items/1/similar?k=5"), httpx.get(f"{full.url}/v1/items/1/similar?k=5")
        assert a.status_code == 200 and a.content == b.content
    finally:
        for srv in (bare, full):
            srv.proc.terminate()
            srv.proc.wait(timeout=20)


def test_train_reindex_serve_event_reindex_end_to_end(trained, server, redis_url, redis_prefix):
    from index.reindex import ReindexConfig
    from index.reindex import run as reindex

    user = _a_known_user(trained)
    with httpx.Client(base_url=server.url, timeout=10) as c:
        first = c.post("/v1/recall", json={"user_id": user, "k": 20}, headers={"X-Request-ID": "e2e-1"})
        assert first.status_code == 200, first.text
        a = first.json()
        assert first.headers["x-request-id"] == "e2e-1"
        assert len(a["items"]) == 20 and "fallback" not in a
        assert c.post("/v1/recall", json={"user_id": user, "k": 20}).json()["cached"] is True

        top = a["items"][0]["item_id"]
        assert c.post("/v1/events", json={"user_id": user, "item_id": top}).status_code == 200
        b = c.post("/v1/recall", json={"user_id": user, "k": 20}).json()
        assert b["cached"] is False and top not in {i["item_id"] for i in b["items"]}

        old_version = a["index_version"]
        m = reindex(ReindexConfig(artifacts=trained, n_eval_users=50, threads=2, redis_url=redis_url,
                                  redis_prefix=redis_prefix))
        assert m.index_version != old_version
        deadline = time.monotonic() + 60
        while True:
            c_ = c.post("/v1/recall", json={"user_id": user, "k": 20}).json()
            if c_["index_version"] == m.index_version:
                break
            assert c_["index_version"] == old_version  # never anything else
            assert time.monotonic() < deadline, "the new bundle was not picked up"
            time.sleep(0.1)
        assert c_["model_version"] == m.model_version and c_["cached"] is False
        assert top not in {i["item_id"] for i in c_["items"]}, "the event was lost across the reload"

        metrics = c.get("/metrics").text
        assert f'index_version="{m.index_version}"' in metrics
        assert c.get("/openapi.json").json()["info"]["title"] == "twotower recall service"

    logs = server.log_lines()
    assert any(r.get("request_id") == "e2e-1" and r.get("route") == "/v1/recall" for r in logs), \
        "no JSON access log line carried the request id"


def test_sigterm_lets_in_flight_requests_finish_and_refuses_new_ones(trained, free_port, redis_prefix, tmp_path):
    """Six batch requests are held inside the server (its private Redis paused, a long Redis timeout:
    every sub-request waits on its cache lookup) when SIGTERM lands: they are answered in full, a new
    connection meanwhile is refused, and the process exits by itself."""
    from tests.reliability.harness import Load, RedisProc, Req, port_open, server_sockets, wait_until

    def body(j: int) -> dict:
        return {"requests": [{"history": [(u + j) % 120 + 1, (u * 7 + j) % 120 + 1, j % 120 + 1], "k": 100,
                              "exclude_ids": [j, u]} for u in range(256)]}

    with RedisProc(tmp_path / "redis") as redis:
        srv = start_server(trained, free_port, redis.url, redis_prefix, tmp_path / "server.log",
                           TT_REDIS_TIMEOUT_S="60", TT_GRACEFUL_TIMEOUT_S="60")
        try:
            redis.pause()
            try:
                load = Load(srv.url, lambda j: ("batch", Req("POST", "/v1/recall/batch", body(j))), concurrency=6,
                            max_requests=6, max_seconds=120, timeout=120).start()
                # all six sent in full and read by the server: in flight, waiting on Redis
                wait_until(lambda: load.delivered == 6 and (lambda q: len(q) == 6 and not any(q))(
                    server_sockets(srv.proc.pid, srv.port)), 60, "every request sent and read by the server")
                assert not load.outcomes, "requests finished while Redis was paused"
                srv.proc.send_signal(signal.SIGTERM)
                wait_until(lambda: not port_open(srv.port), 60, "the listener closing after SIGTERM")
                with pytest.raises(httpx.ConnectError):
                    httpx.get(f"{srv.url}/healthz", timeout=5)
                assert srv.proc.poll() is None, "exited with requests in flight"
            finally:
                redis.resume()
            load.join()
            # uvicorn re-raises the signal after its graceful shutdown, so "killed by SIGTERM" is the clean exit
            assert srv.proc.wait(timeout=60) in (0, -signal.SIGTERM)
        finally:
            if srv.proc.poll() is None:
                srv.proc.kill()
    assert load.counts == {"200": 6}, (load.counts, [o.error or o.body_4xx for o in load.outcomes][:3])
    assert all(len(o.versions) == 256 for o in load.outcomes)
    logs = srv.log_lines()
    assert not any(r.get("level") == "ERROR" for r in logs), [r for r in logs if r.get("level") == "ERROR"][:3]


def _thp_madvise() -> bool:
    import platform

    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    lib, version = platform.libc_ver()
    return "[madvise]" in thp and lib == "glibc" and tuple(int(x) for x in version.split(".")[:2]) >= (2, 35)


@pytest.mark.skipif(not _thp_madvise(), reason="needs Linux, glibc >= 2.35 and THP in madvise mode")
def test_serve_restarts_itself_onto_huge_pages_unless_told_not_to(trained, free_port, redis_url, redis_prefix,
                                                                   tmp_path):
    def environ(pid: int) -> dict[str, str]:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        return dict(kv.decode().split("=", 1) for kv in raw if b"=" in kv)

    srv = start_server(trained, free_port, redis_url, redis_prefix, tmp_path / "on.log")
    try:
        env = environ(srv.proc.pid)  # the same process (exec keeps the pid), now with the tunable
        assert "glibc.malloc.hugetlb=1" in env.get("GLIBC_TUNABLES", "")
        assert httpx.post(f"{srv.url}/v1/recall", json={"k": 3}).status_code == 200
        assert any("GLIBC_TUNABLES" in line.get("msg", "") for line in srv.log_lines())
    finally:
        srv.proc.terminate()
        srv.proc.wait(timeout=20)
    off = start_server(trained, free_port, redis_url, redis_prefix, tmp_path / "off.log", TT_HUGEPAGES="false")
    try:
        assert "glibc.malloc.hugetlb" not in environ(off.proc.pid).get("GLIBC_TUNABLES", "")
        assert httpx.post(f"{off.url}/v1/recall", json={"k": 3}).status_code == 200
    finally:
        off.proc.terminate()
        off.proc.wait(timeout=20)


def _children(pid: int) -> list[int]:
    return process_tree(pid)[1:]


def _established_on(port: int, pid: int) -> int:
    """Established TCP connections to local ``port`` whose socket ``pid`` holds (from /proc)."""
    from tests.reliability.harness import server_sockets

    return len(server_sockets(pid, port))


def _held_on(port: int, pid: int) -> int:
    """TCP connections to local ``port`` (in any state) whose socket ``pid`` still has open. A worker
    closes its end after telling the supervisor the connection is done."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    return sum(1 for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
               if (f := line.split()) and int(f[1].split(":")[1], 16) == port and f[9] in inodes and f[3] != "0A")


def _until(check, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.02)


def _wait_log(srv: Server, text: str, count: int = 1, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while sum(text in r.get("msg", "") for r in srv.log_lines()) < count:
        assert srv.proc.poll() is None, f"server exited: {srv.log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"never logged {text!r} x{count}"
        time.sleep(0.1)


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads connections from Linux's /proc")
def test_workers_share_connections_evenly_all_take_a_new_bundle_and_a_dead_one_is_replaced(
        trained, free_port, redis_url, redis_prefix, tmp_path):
    import http.client

    srv = start_server(trained, free_port, redis_url, redis_prefix, tmp_path / "server.log", TT_WORKERS="2")
    conns: list[http.client.HTTPConnection] = []
    fresh: list[int] = []
    try:
        _wait_log(srv, "2 of 2 ready")
        workers = _children(srv.proc.pid)
        assert len(workers) == 2, workers
        # a client pool opening its keep-alive connections in a burst, as wrk or a sidecar does
        for _ in range(8):
            c = http.client.HTTPConnection("127.0.0.1", free_port, timeout=10)
            c.request("POST", "/v1/recall", body=json.dumps({"k": 3}), headers={"Content-Type": "application/json"})
            r = c.getresponse()
            assert r.status == 200 and json.loads(r.read())["items"]
            conns.append(c)
        split = sorted(_established_on(free_port, pid) for pid in workers)
        assert split == [4, 4], f"connections per worker: {split}"
        # closed connections are given back: the next burst is balanced again
        for c in conns[:6]:
            c.close()
        conns = conns[6:]
        _until(lambda: sum(_held_on(free_port, pid) for pid in workers) == 2, "the workers closing 6 connections")
        for _ in range(4):
            c = http.client.HTTPConnection("127.0.0.1", free_port, timeout=10)
            c.request("GET", "/healthz")
            r = c.getresponse()
            assert r.status == 200 and r.read()
            conns.append(c)
        assert sorted(_established_on(free_port, pid) for pid in workers) == [3, 3]

        # a new bundle reaches every worker: all six connections (three on each) end up on it
        from index.reindex import ReindexConfig
        from index.reindex import run as reindex

        def version(c: http.client.HTTPConnection) -> str:
            c.request("POST", "/v1/recall", body=b'{"k": 3}', headers={"Content-Type": "application/json"})
            return str(json.loads(c.getresponse().read())["index_version"])

        before = {version(c) for c in conns}
        reindex(ReindexConfig(artifacts=trained, n_eval_users=50, threads=2))
        published = (trained / "bundles" / "CURRENT").read_text().strip()
        assert len(before) == 1 and published not in before, (before, published)
        deadline = time.monotonic() + 30
        while (seen := {version(c) for c in conns}) != {published}:
            assert time.monotonic() < deadline, f"workers still serve {seen}, published {published}"
            time.sleep(0.2)

        # a worker killed outright: the other keeps answering, and a new one takes its place
        # (the supervisor's own word that it reaped the process: a killed process shows as a zombie
        # while its other threads are still closing its descriptors, and a connection handed to
        # it in that window dies with it, as it would on any server whose worker crashes)
        os.kill(workers[0], signal.SIGKILL)
        _wait_log(srv, f"(pid {workers[0]}) exited")
        for _ in range(10):
            assert httpx.post(f"{srv.url}/v1/recall", json={"k": 3}, timeout=10).status_code == 200
        _wait_log(srv, "starting another")
        _wait_log(srv, "2 of 2 ready", count=2)
        fresh = _children(srv.proc.pid)
        assert len(fresh) == 2 and workers[0] not in fresh and workers[1] in fresh, (workers, fresh)

        # both at once: a request sent while no worker is up waits in the backlog for the next one
        for pid in fresh:
            os.kill(pid, signal.SIGKILL)
        for pid in fresh:
            _wait_log(srv, f"(pid {pid}) exited")
        assert httpx.post(f"{srv.url}/v1/recall", json={"k": 3}, timeout=60).status_code == 200
        _wait_log(srv, "2 of 2 ready", count=3)
        fresh = _children(srv.proc.pid)
    finally:
        for c in conns:
            c.close()
        srv.proc.send_signal(signal.SIGTERM)
        try:
            code = srv.proc.wait(timeout=30)
        finally:
            if srv.proc.poll() is None:
                srv.proc.kill()
    assert code == 0
    assert fresh and not [p for p in fresh if Path(f"/proc/{p}").exists()], "workers outlived the supervisor"
    assert "all workers stopped" in srv.log.read_text()
