"""The compose stack built and run for real: `make stack-test` (needs a Docker engine and Compose v2).

What it does, in order, reporting a timing for each step:
1. checks the engine and Compose v2; makes sure the base images exist (a `docker pull`, or, where no
   registry answers, scripts/local-images.sh builds stand-ins from Debian's packages) and that the
   jobs image can get CPU torch (the PyTorch index, or the local wheel pip already knows, served
   on 127.0.0.1 as a package index);
2. builds the api and jobs images (BuildKit, through Compose v2) and reports the api image's size;
3. trains a model (synthetic data) and reindexes (bundle 1), then brings up Redis, N api replicas
   and haproxy (`docker compose up`), under a project name of its own, with free loopback ports;
4. recalls through the load balancer;
5. trains a second model, then reindexes under load: bundle 2 with a new (model, index) pair. Every
   answer must carry one of the two published pairs; no request may fail; both replicas must serve
   bundle 2 within 1 s of its publication (measured from the moment bundles/CURRENT changes to the
   moment each replica's /readyz names it, each polled every 10 ms);
6. SIGKILLs one replica under load: at most the requests in flight on it may fail;
7. with `--monitoring`, starts Prometheus (profile `monitoring`) and checks it scrapes every replica;
8. tears everything down (containers, network, volumes) and, unless --keep-images, removes the
   images and build cache it made.

The load goes to 127.0.0.1 only: the balancer's published port, and each replica's own port, which
a generated compose override publishes on loopback for the readiness polls.

    python scripts/stack_test.py [--replicas 2] [--keep-images] [--monitoring] [--json out.json]

Exit status 0 when every target is met, 1 when one is not, 2 when the stack cannot be run here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGES = ["python:3.11-slim-bookworm", "redis:7-bookworm", "haproxy:lts-bookworm"]
PROM_IMAGE = "prom/prometheus:v2.53.0"
BUILT_IMAGES = ["twotower-api:latest", "twotower-jobs:latest"]
TORCH_VERSION = "2.13.0"
PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


class CannotRun(RuntimeError):
    """The stack cannot be run on this machine (no engine, no Compose v2...)."""


def log(msg: str) -> None:
    print(f"[stack {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(cmd: list[str], *, env: dict[str, str] | None = None, check: bool = True, capture: bool = False,
        timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, cwd=ROOT, env=env, text=True, timeout=timeout,
                         stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None)
    if check and res.returncode != 0:
        detail = (res.stderr or "")[-3000:] if capture else ""
        raise RuntimeError(f"`{' '.join(cmd)}` exited {res.returncode}\n{detail}")
    return res


def http_json(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"null")
        except ValueError:
            return e.code, None
    except OSError:  # refused, reset, timed out: nobody answers there (a killed replica)
        return 0, None


# ------------------------------------------------------------------------------------------------
# preparing the engine


def check_engine() -> str:
    if shutil.which("docker") is None:
        raise CannotRun("no `docker` command")
    info = run(["docker", "info", "--format", "{{.ServerVersion}} {{.Driver}}"], check=False, capture=True)
    if info.returncode != 0:
        raise CannotRun(f"no Docker engine answers ({(info.stderr or '').strip()[:200]})")
    v = run(["docker", "compose", "version", "--short"], check=False, capture=True)
    if v.returncode != 0 or not v.stdout.strip().lstrip("v").startswith(("2", "3")):
        raise CannotRun("Compose v2 is needed (`docker compose`): the images are built with BuildKit through it")
    return f"engine {info.stdout.strip()}, compose {v.stdout.strip()}"


def have_image(name: str) -> bool:
    return run(["docker", "image", "inspect", name], check=False, capture=True).returncode == 0


def ensure_base_images(images: list[str]) -> tuple[str, bool]:
    """(what was done, whether local stand-ins were made)."""
    missing = [i for i in images if not have_image(i)]
    pulled = [i for i in missing if run(["docker", "pull", i], check=False, capture=True, timeout=600).returncode == 0]
    still = [i for i in missing if i not in pulled]
    if not still:
        return ("pulled " + ", ".join(pulled) if pulled else "present"), False
    log(f"no registry gave {still}: building local stand-ins from Debian (scripts/local-images.sh)")
    run(["bash", str(ROOT / "scripts" / "local-images.sh"), "make"])
    return f"local stand-ins for {still} (scripts/local-images.sh)", True


def bridge_networking() -> bool:
    """Whether build containers get a network of their own (an engine started with --bridge=none
    gives them none: builds then use the host's)."""
    return run(["docker", "network", "inspect", "bridge"], check=False, capture=True).returncode == 0


class TorchIndex:
    """The PyTorch CPU index when it answers; else the local CPU wheel pip knows about (pip's
    find-links), served as a one-package index on 127.0.0.1 for the build (which then needs the
    host network)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.url, self.how = workdir, PYTORCH_CPU_INDEX, "PyTorch CPU index"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> TorchIndex:
        if os.environ.get("TORCH_CPU_INDEX"):
            self.url, self.how = os.environ["TORCH_CPU_INDEX"], "TORCH_CPU_INDEX"
            return self
        try:
            urllib.request.urlopen(f"{PYTORCH_CPU_INDEX}/torch/", timeout=5)
            return self
        except Exception:  # unreachable from here: look for the local wheel
            pass
        wheels = self.workdir / "wheels"
        got = run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-index",
                   f"torch=={TORCH_VERSION}", "-d", str(wheels)], check=False, capture=True)
        found = sorted(wheels.glob(f"torch-{TORCH_VERSION}+cpu-*.whl")) if got.returncode == 0 else []
        if not found:
            raise CannotRun("the PyTorch CPU index is unreachable and pip knows no local CPU torch wheel; "
                            "set TORCH_CPU_INDEX")
        page = self.workdir / "simple" / "torch"
        page.mkdir(parents=True)
        wheel = found[0]
        shutil.move(str(wheel), self.workdir / wheel.name)
        (page / "index.html").write_text(f'<a href="../../{wheel.name}">{wheel.name}</a>\n')
        port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                      "--directory", str(self.workdir)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.url, self.how = f"http://127.0.0.1:{port}/simple", f"local wheel {wheel.name} served on 127.0.0.1"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


# ------------------------------------------------------------------------------------------------
# the stack


@dataclass
class Stack:
    project: str
    replicas: int
    env: dict[str, str]
    override: Path
    lb_port: int = 0
    prom_port: int = 0

    def compose(self, *args: str, check: bool = True, capture: bool = False,
                timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        return run(["docker", "compose", "-p", self.project, "-f", "docker-compose.yml", "-f", str(self.override),
                    *args], env=self.env, check=check, capture=capture, timeout=timeout)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.lb_port}"

    def replica_urls(self) -> dict[str, str]:
        """container name -> http://127.0.0.1:<its published port>"""
        out = {}
        ps = self.compose("ps", "--format", "json", "api", capture=True).stdout
        rows = [json.loads(line) for line in ps.splitlines() if line.strip().startswith("{")]
        if not rows and ps.strip().startswith("["):
            rows = json.loads(ps)
        for row in rows:
            for p in row.get("Publishers") or []:
                if p.get("TargetPort") == 8000 and p.get("PublishedPort"):
                    out[row["Name"]] = f"http://127.0.0.1:{p['PublishedPort']}"
        return out

    def artifacts_dir(self) -> Path | None:
        """The artifacts volume on this host (Linux, root): where bundles/CURRENT can be watched."""
        res = run(["docker", "volume", "inspect", "--format", "{{.Mountpoint}}", f"{self.project}_artifacts"],
                  check=False, capture=True)
        p = Path(res.stdout.strip()) if res.returncode == 0 else None
        return p if p is not None and os.access(p, os.R_OK) else None


def write_override(path: Path) -> None:
    """Publish each replica's port on a free loopback port (for the per-replica readiness polls)."""
    path.write_text('services:\n  api:\n    ports:\n      - "127.0.0.1::8000"\n')


def wait_for(check: Any, timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # not up yet
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(every)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


# ------------------------------------------------------------------------------------------------
# load


@dataclass
class Load:
    """Recall requests through the balancer from a thread of its own, `concurrency` at a time, until
    stopped: every outcome recorded with its (model, index) pair or its error."""

    url: str
    concurrency: int = 8
    users: int = 200
    items: int = 120
    outcomes: list[tuple[float, float, int, tuple[str, str] | None, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    in_flight: int = 0

    def __enter__(self) -> Load:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=60)

    async def _main(self) -> None:
        import httpx

        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(base_url=self.url, timeout=10.0, limits=limits) as client:
            await asyncio.gather(*(self._worker(client, i) for i in range(self.concurrency)))

    async def _worker(self, client: Any, seed: int) -> None:
        rnd = random.Random(seed)
        while not self._stop.is_set():
            if rnd.random() < 0.6:
                body: dict[str, Any] = {"user_id": rnd.randint(1, self.users), "k": 20}
            else:
                body = {"history": [rnd.randint(1, self.items) for _ in range(3)], "k": 20}
            t0 = time.monotonic()
            self.in_flight += 1
            try:
                r = await client.post("/v1/recall", json=body)
                pair = None
                if r.status_code == 200:
                    doc = r.json()
                    pair = (doc["model_version"], doc["index_version"])
                self.outcomes.append((t0, time.monotonic(), r.status_code, pair, "" if pair else r.text[:200]))
            except Exception as exc:  # connection reset, timeout...
                self.outcomes.append((t0, time.monotonic(), 0, None, f"{type(exc).__name__}: {exc}"[:200]))
            finally:
                self.in_flight -= 1

    def wait_answers(self, n: int, timeout: float = 60.0) -> None:
        wait_for(lambda: sum(1 for o in self.outcomes if o[2] == 200) >= n, timeout, f"{n} answers under load",
                 every=0.05)

    def summary(self, since: float = 0.0) -> dict[str, Any]:
        rows = [o for o in self.outcomes if o[0] >= since]
        failed = [o for o in rows if o[2] != 200]
        lat = sorted(o[1] - o[0] for o in rows if o[2] == 200)
        return {"requests": len(rows), "failed": len(failed),
                "failures": Counter(f"{o[2]} {o[4][:80]}" for o in failed).most_common(5),
                "pairs": Counter(f"{o[3][0]} / {o[3][1]}" for o in rows if o[3] is not None),
                "p50_ms": round(1000 * lat[len(lat) // 2], 1) if lat else None,
                "p99_ms": round(1000 * lat[int(len(lat) * 0.99)], 1) if lat else None}


# ------------------------------------------------------------------------------------------------
# the test


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=8, help="clients of the load")
    ap.add_argument("--keep-images", action="store_true", help="keep the built and base images and build cache")
    ap.add_argument("--no-build", action="store_true", help="use the images already built")
    ap.add_argument("--monitoring", action="store_true", help="also check Prometheus scrapes every replica")
    ap.add_argument("--json", default=None, help="write the report here too")
    args = ap.parse_args(argv)
    report: dict[str, Any] = {"replicas": args.replicas, "concurrency": args.concurrency, "timings_s": {},
                              "targets": {}}
    timings = report["timings_s"]

    def timed(name: str, fn: Any, *a: Any, **kw: Any) -> Any:
        t0 = time.monotonic()
        log(f"{name} ...")
        try:
            return fn(*a, **kw)
        finally:
            timings[name] = round(time.monotonic() - t0, 1)
            log(f"{name}: {timings[name]} s")

    try:
        report["engine"] = check_engine()
    except CannotRun as exc:
        print(f"stack test: cannot run here: {exc}", file=sys.stderr)
        return 2
    log(report["engine"])
    workdir = Path(tempfile.mkdtemp(prefix="tt-stack-"))
    project = f"ttstack{uuid.uuid4().hex[:6]}"
    override = workdir / "compose.override.yml"
    write_override(override)
    env = dict(os.environ, TT_API_REPLICAS=str(args.replicas), TT_PORT=str(free_port()),
               TT_LB_STATS_PORT=str(free_port()), TT_PROMETHEUS_PORT=str(free_port()),
               TT_GRAFANA_PORT=str(free_port()))
    stack = Stack(project, args.replicas, env, override, lb_port=int(env["TT_PORT"]),
                  prom_port=int(env["TT_PROMETHEUS_PORT"]))
    rc = 0
    made_local = False
    try:
        report["base_images"], made_local = timed("base images", ensure_base_images,
                                                  BASE_IMAGES + ([PROM_IMAGE] if args.monitoring else []))
        if not args.no_build:
            with TorchIndex(workdir) as torch_index:
                report["torch_index"] = torch_index.how
                env["TORCH_CPU_INDEX"] = torch_index.url
                if not bridge_networking() or torch_index.proc is not None:
                    env["TT_BUILD_NETWORK"] = "host"
                timed("build images", stack.compose, "--profile", "train", "build", "api", "train")
        sizes = {img: int(run(["docker", "image", "inspect", "--format", "{{.Size}}", img], capture=True).stdout)
                 for img in BUILT_IMAGES}
        report["image_mb"] = {k: round(v / 1e6) for k, v in sizes.items()}
        log(f"image sizes: {report['image_mb']}")

        # the README's order: the jobs first (the first one creates the artifacts volume, owned by the
        # images' user), then the replicas, which load the published bundle as they start
        train = ["--profile", "train", "run", "--rm", "train", "train", "--data", "synthetic", "--synthetic-size",
                 "tiny", "--epochs", "2", "--artifacts", "/artifacts", "--quiet"]
        reindex = ["--profile", "reindex", "run", "--rm", "reindex", "reindex", "--artifacts", "/artifacts",
                   "--n-eval-users", "50"]
        timed("train 1", stack.compose, *train)
        timed("reindex 1", stack.compose, *reindex)
        timed("up (redis, replicas, lb)", stack.compose, "up", "-d", "--wait", "redis", "api", "lb", timeout=600)
        replicas = stack.replica_urls()
        report["replica_names"] = sorted(replicas)
        if len(replicas) != args.replicas:
            raise RuntimeError(f"expected {args.replicas} replicas, compose runs {sorted(replicas)}")

        def versions() -> dict[str, str | None]:
            out = {}
            for name, url in replicas.items():
                code, doc = http_json(f"{url}/readyz", timeout=1)
                out[name] = (doc or {}).get("bundle", {}).get("index_version") if code == 200 else None
            return out

        first = timed("replicas ready on bundle 1", wait_for,
                      lambda: (v := versions()) and len(set(v.values())) == 1 and None not in v.values() and v, 60,
                      "every replica to serve the first bundle")
        v1 = next(iter(first.values()))
        wait_for(lambda: _post(f"{stack.url}/v1/recall", {"user_id": 1, "k": 10})[0] == 200, 60,
                 "the balancer to have a replica in rotation")
        status, answer = _post(f"{stack.url}/v1/recall", {"user_id": 1, "k": 10})
        report["recall_through_lb"] = {"status": status, "items": len((answer or {}).get("items", [])),
                                       "index_version": (answer or {}).get("index_version")}
        log(f"recall through the balancer: {report['recall_through_lb']}")
        m1 = (answer or {}).get("model_version")

        # --- a second model, published under load
        timed("train 2", stack.compose, *train)
        art = stack.artifacts_dir()
        with Load(stack.url, concurrency=args.concurrency) as load:
            load.wait_answers(50)
            t_load = time.monotonic()
            seen_current: dict[str, float] = {}
            swapped: dict[str, float] = {}
            stop = threading.Event()

            def watch() -> None:
                # bundles/CURRENT on the volume (when this host can read it) and each replica's /readyz
                while not stop.is_set():
                    now = time.monotonic()
                    if art is not None and "t" not in seen_current:
                        try:
                            cur = (art / "bundles" / "CURRENT").read_text().strip()
                        except OSError:
                            cur = v1
                        if cur != v1:
                            seen_current["t"], seen_current["v"] = now, cur  # type: ignore[assignment]
                    for name, ver in versions().items():
                        if ver not in (None, v1) and name not in swapped:
                            swapped[name] = time.monotonic()
                    time.sleep(0.01)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            t_reindex = time.monotonic()
            timed("reindex 2 (under load)", stack.compose, *reindex)
            t_reindex_done = time.monotonic()
            try:
                wait_for(lambda: len(swapped) == len(replicas), 30, "every replica to serve the second bundle",
                         every=0.05)
            finally:
                time.sleep(2)  # answers after the swap
                stop.set()
                watcher.join(timeout=5)
            swap = load.summary(since=t_load)
        v2 = _first_other(versions().values(), v1)
        published_at = seen_current.get("t", t_reindex_done)
        report["publish_seen_on_volume"] = "t" in seen_current
        lags = {n: round(t - published_at, 3) for n, t in swapped.items()}
        pairs = set(swap["pairs"])
        status, answer2 = _post(f"{stack.url}/v1/recall", {"user_id": 1, "k": 10})
        m2 = (answer2 or {}).get("model_version")
        published = {f"{m1} / {v1}", f"{m2} / {v2}"}
        report["swap_under_load"] = {**swap, "pairs": dict(swap["pairs"]), "published": sorted(published),
                                     "replica_lag_s": lags, "reindex_s": round(t_reindex_done - t_reindex, 1)}
        t = report["targets"]
        t["swap: 0 failed requests"] = swap["failed"] == 0
        t["swap: every answer's (model, index) pair a published one"] = bool(pairs) and pairs <= published
        t["swap: both models served"] = len(pairs) == 2
        t["swap: every replica on the new bundle within 1 s of publication"] = (
            len(lags) == len(replicas) and max(lags.values()) <= 1.0)
        log(f"swap under load: {report['swap_under_load']}")

        # --- one replica killed under load
        victim = sorted(replicas)[0]
        with Load(stack.url, concurrency=args.concurrency) as load:
            load.wait_answers(50)
            time.sleep(1)
            in_flight = load.in_flight
            t_kill = time.monotonic()
            run(["docker", "kill", "--signal", "KILL", victim], capture=True)
            time.sleep(5)
            kill = load.summary(since=t_kill - 1)
            after = [o for o in load.outcomes if o[0] >= t_kill + 2]
        report["kill_under_load"] = {**kill, "pairs": dict(kill["pairs"]), "victim": victim,
                                     "client_in_flight_at_kill": in_flight,
                                     "failed_2s_after_kill": sum(1 for o in after if o[2] != 200)}
        t["kill: failures at most the requests in flight"] = kill["failed"] <= in_flight
        t["kill: none failed once the balancer noticed (2 s on)"] = report["kill_under_load"]["failed_2s_after_kill"] == 0
        log(f"kill under load: {report['kill_under_load']}")

        if args.monitoring:
            timed("prometheus up", stack.compose, "--profile", "monitoring", "up", "-d", "prometheus")

            def scraped() -> int:
                _c, d = http_json(f"http://127.0.0.1:{stack.prom_port}/api/v1/targets")
                act = (d or {}).get("data", {}).get("activeTargets", [])
                return sum(1 for a in act if a["labels"].get("job") == "twotower-api" and a["health"] == "up")

            alive = len(versions()) - sum(1 for v in versions().values() if v is None)
            n = timed("prometheus scrapes the replicas", wait_for, lambda: scraped() >= alive and scraped(), 60,
                      "Prometheus to scrape the replicas")
            report["prometheus_replicas_up"] = n
            t["monitoring: every live replica scraped"] = n >= alive
        t["api image <= 600 MB"] = report["image_mb"]["twotower-api:latest"] <= 600
        rc = 0 if all(t.values()) else 1
    except Exception as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
        log(f"FAILED: {report['error']}")
        rc = 1
    finally:
        try:
            timed("down", stack.compose, "--profile", "train", "--profile", "reindex", "--profile", "monitoring",
                  "down", "-v", "--remove-orphans", check=False)
            if not args.keep_images:
                timed("remove images", _remove_images, made_local)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    report["timings_s"] = timings
    print(json.dumps(report, indent=2, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    for name, ok in report["targets"].items():
        log(f"{'met    ' if ok else 'NOT MET'} {name}")
    return rc


def _post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, None


def _first_other(values: Any, v1: str) -> str:
    return next(v for v in values if v not in (None, v1))


def _remove_images(made_local: bool) -> None:
    """What the test built, the local stand-in base images if it made them, and the build cache (a
    copying storage driver keeps every layer as a full copy)."""
    run(["docker", "image", "rm", "-f", *BUILT_IMAGES], check=False, capture=True)
    if made_local:
        run(["bash", str(ROOT / "scripts" / "local-images.sh"), "clean"], check=False, capture=True)
    run(["docker", "builder", "prune", "-af"], check=False, capture=True)
    run(["docker", "image", "prune", "-f"], check=False, capture=True)


if __name__ == "__main__":
    sys.exit(main())
