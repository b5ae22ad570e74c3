"""Real processes for the reliability tests and the soak: a private redis-server that can be killed,
paused and restarted, a real ``twotower serve`` (uvicorn) subprocess on a free loopback port, and a
load generator that runs in a background thread while a test injects faults.

Everything here is bounded: every wait has a deadline, every load run stops at a request count AND
a time limit, and every process is killed by whoever started it (``with`` blocks / fixture
teardowns), whatever happened.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------
# small utilities


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """Call ``check`` until it returns something truthy; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except (OSError, httpx.HTTPError) as exc:  # the thing we wait for may not listen yet
            last = exc
        if last and not isinstance(last, BaseException):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")
        time.sleep(every)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB, from /proc (no psutil needed)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14 and 15 of stat)


def process_tree(pid: int) -> list[int]:
    """``pid`` followed by its live descendants (a ``TT_WORKERS`` > 1 supervisor's workers), from /proc."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):  # exited while we looked
                continue
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [c for c, p in parent.items() if p in frontier and c not in tree]
        tree += frontier
    return tree


def tree_total(measure: Callable[[int], float], pid: int) -> float:
    """``measure`` (rss_kib, cpu_seconds) summed over ``pid`` and its live descendants."""
    total = 0.0
    for p in process_tree(pid):
        try:
            total += measure(p)
        except (OSError, RuntimeError):  # exited between listing and reading
            continue
    return total


# --------------------------------------------------------------------------------------------
# a private redis-server


class RedisProc:
    """``redis-server --port <free> --save "" --appendonly no`` that only one test (or the soak) uses."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProc:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (`make test` installs it)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: port_open(self.port), 10, f"redis-server on port {self.port}")
        return self

    def kill(self) -> None:
        """SIGKILL: the crash case, no goodbye to clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung Redis)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5)

    def __enter__(self) -> RedisProc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.resume()  # a paused server is continued first so it exits like any other
        self.kill()


# --------------------------------------------------------------------------------------------
# a real server


class ServerProc:
    """``python -m twotower.cli serve`` on 127.0.0.1:<free port>, configured through TT_* variables."""

    def __init__(self, artifacts: Path, log: Path, *, redis_url: str = "", prefix: str = "tt-rel",
                 env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.artifacts, self.log = Path(artifacts), Path(log)
        self.port = port or free_port()
        self.redis_url, self.prefix = redis_url, prefix
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, ready_timeout: float = 120.0) -> ServerProc:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TT_")}
        env.update({"TT_REDIS_PREFIX": self.prefix, "TT_LOG_LEVEL": "WARNING", "TT_ACCESS_LOG": "false",
                    "TT_RELOAD_POLL_S": "0.2", "PYTHONUNBUFFERED": "1", **self.env})
        cmd = [sys.executable, "-m", "twotower.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--artifacts", str(self.artifacts), "--redis-url", self.redis_url]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        try:
            # importing torch + faiss on a busy 2-core machine can take tens of seconds
            wait_until(self._ready, ready_timeout, f"server on port {self.port} ready", every=0.1)
        except BaseException:
            self.kill()
            raise
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"server exited with {self.proc.returncode} before it was ready:\n{self.log_text()}")
        return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200

    def readyz(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/readyz", timeout=5).json()

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time. Returns the exit code."""
        if self.proc is None:
            return None
        self.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode

    def __enter__(self) -> ServerProc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# load


@dataclass
class Req:
    method: str
    path: str
    body: Any = None


@dataclass
class Outcome:
    kind: str  # a label chosen by the request factory ("recall", "batch", ...)
    t0: float  # monotonic time the request was started
    t1: float  # ... and answered (or failed)
    status: int | None  # None: transport error (refused, reset, timeout)
    error: str | None = None
    # of a 200 recall answer: (model_version, index_version, cached); of a batch: one per result
    versions: list[tuple[str, str, bool]] = field(default_factory=list)
    # ... and the item ids of each result, in the same order
    items: list[list[Any]] = field(default_factory=list)
    request: Any = None  # the JSON body that was sent
    body_4xx: str | None = None


class Load:
    """Run requests from ``make(i)`` at a fixed concurrency in a background thread until
    ``max_requests`` were sent, ``max_seconds`` passed, or ``stop()`` is called.

    ``make(i)`` returns (kind, Req). Answers are reduced to what tests check (status, versions,
    cached), so a long soak does not hold every body in memory; with ``keep=False`` only failures
    (the first 1000) are kept.
    """

    def __init__(self, base_url: str, make: Callable[[int], tuple[str, Req]], *, concurrency: int = 8,
                 max_requests: int = 100_000, max_seconds: float = 60.0, timeout: float = 30.0,
                 keep: bool = True) -> None:
        self.base_url, self.make = base_url, make
        self.concurrency, self.max_requests, self.max_seconds = concurrency, max_requests, max_seconds
        self.timeout, self.keep = timeout, keep
        self.outcomes: list[Outcome] = []
        self.counts: Counter[str] = Counter()  # status (or error name) -> count, always kept
        self.latencies: list[float] = []
        self.sent = 0
        self.delivered = 0  # requests whose body was written in full to the socket
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started_at = self.ended_at = 0.0
        self.crash: BaseException | None = None

    # ------------------------------------------------------------------ control
    def start(self) -> Load:
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> Load:
        assert self._thread is not None
        self._thread.join(timeout if timeout is not None else self.max_seconds + self.timeout + 10)
        if self._thread.is_alive():
            raise AssertionError("the load thread did not stop in time")
        if self.crash is not None:
            raise self.crash
        return self

    def run(self) -> Load:
        """Foreground: start and wait for the end."""
        return self.start().join()

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.join()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_for(self, check: Callable[[Load], bool], timeout: float, what: str) -> None:
        wait_until(lambda: check(self), timeout, what)

    # ------------------------------------------------------------------ results
    @property
    def ok(self) -> int:
        return self.counts.get("200", 0)

    def errors(self) -> dict[str, int]:
        return {k: v for k, v in self.counts.items() if k != "200"}

    def server_errors(self) -> int:
        return sum(v for k, v in self.counts.items() if k.isdigit() and int(k) >= 500)

    def transport_errors(self) -> int:
        return sum(v for k, v in self.counts.items() if not k.isdigit())

    def percentile_ms(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        return 1000.0 * xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]

    def summary(self) -> dict[str, Any]:
        dur = max(1e-9, self.ended_at - self.started_at)
        return {"requests": self.sent, "ok": self.ok, "errors": self.errors(), "5xx": self.server_errors(),
                "transport_errors": self.transport_errors(), "seconds": round(dur, 2),
                "rps": round(self.sent / dur, 1), "p50_ms": round(self.percentile_ms(50), 2),
                "p99_ms": round(self.percentile_ms(99), 2), "concurrency": self.concurrency}

    def pairs(self) -> set[tuple[str, str]]:
        return {(m, i) for o in self.outcomes for (m, i, _c) in o.versions}

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced by join()
            self.crash = exc

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        deadline = time.monotonic() + self.max_seconds
        counter = iter(range(self.max_requests))
        self.started_at = time.monotonic()
        async with httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout, limits=limits) as client:
            async def worker() -> None:
                while not self._stop.is_set() and time.monotonic() < deadline:
                    i = next(counter, None)
                    if i is None:
                        return
                    self.sent += 1
                    kind, req = self.make(i)
                    await self._one(client, kind, req)

            await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        self.ended_at = time.monotonic()

    async def _trace(self, event: str, info: dict[str, Any]) -> None:
        if event == "http11.send_request_body.complete":
            self.delivered += 1

    async def _one(self, client: httpx.AsyncClient, kind: str, req: Req) -> None:
        t0 = time.monotonic()
        try:
            r = await client.request(req.method, req.path, json=req.body, extensions={"trace": self._trace})
        except httpx.HTTPError as exc:
            t1 = time.monotonic()
            name = type(exc).__name__
            self.counts[name] += 1
            # failures are kept even when answers are not (they are what a report needs)
            if self.keep or len(self.outcomes) < 1000:
                self.outcomes.append(Outcome(kind, t0, t1, None, error=f"{name}: {exc!r} after {t1 - t0:.3f}s"))
            return
        t1 = time.monotonic()
        self.latencies.append(t1 - t0)
        self.counts[str(r.status_code)] += 1
        if not self.keep and (r.status_code == 200 or len(self.outcomes) >= 1000):
            return
        out = Outcome(kind, t0, t1, r.status_code, request=req.body)
        if r.status_code == 200:
            results = list(_results_of(r.content))
            out.versions = [(d["model_version"], d["index_version"], bool(d.get("cached"))) for d in results]
            out.items = [[it["item_id"] for it in d.get("items", [])] for d in results]
        elif r.status_code >= 400:
            out.body_4xx = r.text[:500]
        self.outcomes.append(out)


def server_sockets(pid: int, port: int) -> list[int]:
    """Unread bytes (the receive queue) of every established connection to local ``port`` that
    process ``pid`` holds, from /proc. A request whose bytes were all sent and whose connection
    shows 0 here has been read by the server."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    out = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "01" and int(f[1].rsplit(":", 1)[1], 16) == port and f[9] in inodes:
                out.append(int(f[4].split(":")[1], 16))
    return out


def _results_of(content: bytes) -> Iterable[dict[str, Any]]:
    """The recall answers in a body: the body itself, or each result of a batch."""
    doc = json.loads(content)
    if not isinstance(doc, dict):
        return
    for d in doc.get("results", [doc]):
        if isinstance(d, dict) and "index_version" in d:
            yield d


def published_pairs(artifacts: Path) -> set[tuple[str, str]]:
    """(model_version, index_version) of every bundle under artifacts/bundles (from the manifests)."""
    out = set()
    for m in (Path(artifacts) / "bundles").glob("*/manifest.json"):
        d = json.loads(m.read_text())
        out.add((d["model_version"], d["index_version"]))
    return out


def current_index_version(artifacts: Path) -> str:
    return (Path(artifacts) / "bundles" / "CURRENT").read_text().strip()
