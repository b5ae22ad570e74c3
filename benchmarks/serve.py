"""Serving benchmark: the recall service against a bare FastAPI endpoint, in the same run.

What it measures (each for a fixed duration, so the load is bounded):
- bare:      a FastAPI app with the same request model, returning a pre-serialised answer of the
             same size: the ceiling of HTTP + validation + response on this machine;
- cached:    the same recall body again and again (after the first, every request is a cache hit,
             answered from the server's in-process tier within TT_LOCAL_CACHE_TTL_S: no Redis
             round trip; Redis holds the answer for the other processes and after the TTL);
- uncached:  every request a different inline history (every request misses the cache: user
             tower forward + FAISS search + filtering + a cache write);
each with micro-batching on and off, at several concurrencies, over a bundle of ``--items`` items
(default 1M) built through the real reindex job (IVF index, nprobe tuned by the recall gate).

The model is untrained (latency does not depend on the weights), but its item vectors are
clustered by topic the way trained ones are, so the IVF index behaves as it would in production.

Load driver: wrk (C, one thread) when installed, else a raw-socket asyncio driver. Either way it
runs on the same machine as the servers. It is pinned to one CPU (``--driver-cpu``, by default the
last one when there are at least 2), so that it cannot land on the core a server is using and
share its time slices with it. The servers themselves are not pinned. One uncached row per
concurrency runs with the driver unpinned, so the report shows what pinning changes; that has
varied from nothing (the two rows within 1%) to ~3 ms of p99 at concurrency 8. What moves p99 far
more on the reference VM is CPU steal, which every row reports.

    python benchmarks/serve.py                       # 1M items, concurrency 8 and 32, 10 s each
    python benchmarks/serve.py --items 100000 --duration 5 --concurrency 8
Writes benchmarks/results/serve.md (and .json beside it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# A typical answer has k items; the bare endpoint returns a body of the same size.
K = 100


# --------------------------------------------------------------------------------------------
# the bundle


def build_bench_bundle(artifacts: Path, n_items: int, n_users: int = 20_000, per_user: int = 20,
                       n_topics: int = 1000, dim: int = 64, seed: int = 0, nprobe: int | None = 8) -> dict[str, Any]:
    """Write models/<v>/ (untrained model with topic-clustered item vectors + data tables) and run
    the real reindex job on it. Returns the manifest as a dict."""
    import numpy as np
    import pandas as pd
    import torch

    from index.reindex import ReindexConfig
    from index.reindex import run as reindex
    from towers.artifacts import LATEST, new_version, write_pointer
    from towers.checkpoint import TwoTowerModel, save_checkpoint
    from towers.features import FeatureEncoder
    from towers.model import TowerConfig
    from towers.schema import FeatureSpec

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    topic = rng.integers(0, n_topics, n_items)
    item_ids = np.arange(1, n_items + 1, dtype=np.int64)
    items = pd.DataFrame({"topic": [f"t{t}" for t in topic],
                          "year": rng.integers(1950, 2024, n_items).astype("float64")},
                         index=pd.Index(item_ids, name="item_id"))
    user_ids = [str(u) for u in range(1, n_users + 1)]
    users = pd.DataFrame({"age": rng.integers(18, 80, n_users).astype("float64"),
                          "country": rng.choice(["de", "fr", "us", "jp", "br"], n_users)},
                         index=pd.Index(user_ids, name="user_id"))
    # each user sticks to a few topics, as real taste does
    by_topic = [np.flatnonzero(topic == t) for t in range(n_topics)]
    rows_u, rows_i = [], []
    for u in user_ids:
        tops = rng.integers(0, n_topics, 3)
        for t in rng.choice(tops, per_user):
            pool = by_topic[int(t)]
            rows_u.append(u)
            rows_i.append(int(item_ids[pool[rng.integers(0, len(pool))]]))
    inter = pd.DataFrame({"user_id": rows_u, "item_id": np.asarray(rows_i, dtype=np.int64),
                          "timestamp": np.arange(len(rows_u), dtype=np.int64) + 1_600_000_000,
                          "weight": np.ones(len(rows_u))})

    uf = [FeatureSpec("age", "numeric"), FeatureSpec("country", "categorical")]
    itf = [FeatureSpec("topic", "categorical"), FeatureSpec("year", "numeric")]
    enc = FeatureEncoder.fit(users, items, uf, itf, history_len=50)
    cfg = TowerConfig(model="youtubednn", dim=dim, emb_dim=dim, feature_dim=16, hidden=(2 * dim,))
    model = TwoTowerModel.create(cfg, enc)
    ut, it = model.user_tower, model.item_tower
    assert ut is not None and ut.hist_emb is not None and it is not None and it.id_emb is not None
    with torch.no_grad():
        # What training would give, set by hand: item vectors are topic centres plus per-item noise
        # (the history table holds the same vectors, as with tied embeddings), and the user tower
        # maps a user to the mean of their history's vectors: relu(h) - relu(-h) = h through the
        # 2*dim hidden layer, user id and features weighted out. Queries then sit near the topics
        # they came from, and an IVF index needs the small nprobe it needs in production.
        centres = torch.nn.functional.normalize(torch.randn(n_topics, dim), dim=-1)
        vecs = centres[torch.from_numpy(topic)] + 0.35 * torch.randn(n_items, dim) / dim ** 0.5
        it.id_emb.weight[1:] = vecs
        ut.hist_emb.weight[1:] = vecs
        if it.content is not None:
            it.content[-1].weight.mul_(0.05)  # type: ignore[operator]
            it.content[-1].bias.zero_()  # type: ignore[operator]
        lin1, lin2 = ut.mlp[0], ut.mlp[-1]
        eye = torch.eye(dim)
        off = cfg.emb_dim if ut.user_emb is not None else 0  # the history block follows the user id block
        lin1.weight.zero_()
        lin1.bias.zero_()
        lin1.weight[:dim, off:off + dim] = eye  # type: ignore[index]
        lin1.weight[dim:, off:off + dim] = -eye  # type: ignore[index]
        lin2.weight.zero_()
        lin2.bias.zero_()
        lin2.weight[:, :dim] = eye  # type: ignore[index]
        lin2.weight[:, dim:] = -eye  # type: ignore[index]

    version = new_version()
    mdir = artifacts / "models" / version
    (mdir / "data").mkdir(parents=True)
    save_checkpoint(mdir / "model.pt", model.eval(), {"model_version": version, "bench": True})
    items.to_parquet(mdir / "data" / "items.parquet")
    users.to_parquet(mdir / "data" / "users.parquet")
    inter.to_parquet(mdir / "data" / "interactions.parquet", index=False)
    write_pointer(artifacts / "models" / LATEST, version)
    t0 = time.perf_counter()
    from index.bundle import BundleError

    try:
        # nprobe fixed at 8 rather than left to the gate: the gate measures the bundle's users, who
        # each keep to 3 topics and are easy to serve, while the uncached load below sends random
        # 5-item histories. The recall gate still has to pass (recall@100 >= 0.95 against exact),
        # and the recall of the load's own queries is measured below.
        m = reindex(ReindexConfig(artifacts=artifacts, n_eval_users=500, redis_url=None, nprobe=nprobe))
    except BundleError as exc:
        print(f"nprobe={nprobe} failed the recall gate ({exc}); letting the job choose", flush=True)
        m = reindex(ReindexConfig(artifacts=artifacts, n_eval_users=500, redis_url=None))
    d = m.to_dict()
    d["reindex_s"] = round(time.perf_counter() - t0, 1)
    d["load_recall"] = load_recall(artifacts, n_items)
    return d


def load_recall(artifacts: Path, n_items: int, n_queries: int = 300, k: int = K) -> float:
    """recall@k of the served index for queries like the uncached load's (5 random items each),
    against exact search over the bundle's item vectors."""
    import numpy as np

    from index.bundle import current_bundle_dir, load_bundle
    from index.searcher import ExactSearcher, recall_at_k

    b = load_bundle(current_bundle_dir(artifacts))
    rng = np.random.default_rng(12345)
    hist = [[int(x) for x in rng.integers(1, n_items + 1, 5)] for _ in range(n_queries)]
    q = b.model.embed_users([None] * n_queries, None, hist)
    vecs = np.load(b.path / "item_vectors.npy")
    faiss_ids = b.id_map.faiss_ids
    _, truth = ExactSearcher(vecs, faiss_ids, device="cpu").search(q, k)
    _, got = b.searcher.search(q, k)
    return float(recall_at_k(got, truth, k))


# --------------------------------------------------------------------------------------------
# servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 300.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def start_service(artifacts: Path, port: int, redis_url: str, prefix: str, microbatch: bool,
                  log: Path, workers: int = 1) -> subprocess.Popen[bytes]:
    env = dict(os.environ, TT_ARTIFACTS=str(artifacts), TT_REDIS_URL=redis_url, TT_REDIS_PREFIX=prefix,
               TT_MICROBATCH="true" if microbatch else "false", TT_HOST="127.0.0.1", TT_PORT=str(port),
               TT_RELOAD_POLL_S="0", TT_LOG_LEVEL="INFO", TT_WORKERS=str(workers))
    proc = subprocess.Popen([sys.executable, "-m", "twotower.cli", "serve"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
    deadline = time.monotonic() + 300
    while workers > 1 and f"{workers} of {workers} ready" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"not every worker became ready; see {log}")
        time.sleep(0.2)
    return proc


def start_bare(port: int, answer: bytes) -> subprocess.Popen[bytes]:
    tmp = Path(tempfile.mkdtemp()) / "answer.json"
    tmp.write_bytes(answer)
    proc = subprocess.Popen([sys.executable, __file__, "_bare", "--port", str(port), "--answer", str(tmp)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(f"http://127.0.0.1:{port}/healthz", proc)
    return proc


def run_bare(port: int, answer_path: str) -> None:
    """The bare endpoint: same uvicorn flags, same request model, a fixed pre-serialised answer."""
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import Response

    from service.app import _telemetry
    from service.schemas import make_models
    from service.settings import Settings

    answer = Path(answer_path).read_bytes()
    RecallRequest = make_models(Settings()).RecallRequest
    app = FastAPI(**_telemetry(Settings()))  # FastAPI's OpenTelemetry hooks as the service has them

    async def recall(body: RecallRequest) -> Response:  # type: ignore[valid-type]
        return Response(answer, media_type="application/json")

    recall.__annotations__["body"] = RecallRequest  # the model is built at run time
    app.post("/v1/recall")(recall)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------------
# load drivers


@dataclass
class Result:
    name: str
    concurrency: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: int
    driver: str
    extra: dict[str, Any] = field(default_factory=dict)


_LUA_FIXED = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[%s]]
"""

# every request a fresh history of 5 random items: a cache miss each time
_LUA_UNIQUE = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local n = %d
math.randomseed(%d)
request = function()
  local h = {}
  for i = 1, 5 do h[i] = tostring(math.random(1, n)) end
  local body = '{"history":[' .. table.concat(h, ",") .. '],"k":%d}'
  return wrk.format(nil, nil, nil, body)
end
"""

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"cannot parse wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk_run(name: str, url: str, lua: str, concurrency: int, duration: float, cpu: int | None = None) -> Result:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(lua)
        script = f.name
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{int(duration)}s", "--latency", "--timeout", "5s", "-s", script, url]
    pin = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, preexec_fn=pin).stdout
    os.unlink(script)
    lat = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M))
    total = re.search(r"(\d+) requests in ([\d.]+)(s|m)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if not (lat and total and rps):
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    secs = float(total.group(2)) * (60 if total.group(3) == "m" else 1)
    errors = int(non2xx.group(1)) if non2xx else 0
    if sock:
        errors += sum(int(x) for x in sock.groups())
    return Result(name, concurrency, int(total.group(1)), secs, float(rps.group(1)), _ms(lat["50"]),
                  _ms(lat["90"]), _ms(lat["99"]), errors, "wrk")


async def _py_worker(host: str, port: int, make_body, deadline: float, lat: list[float], errs: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < deadline:
            body = make_body()
            req = (f"POST /v1/recall HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
            t0 = time.perf_counter()
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            m = re.search(rb"content-length: (\d+)", head, re.I)
            await reader.readexactly(int(m.group(1)) if m else 0)
            lat.append(time.perf_counter() - t0)
            if not head.startswith(b"HTTP/1.1 2"):
                errs.append(1)
    finally:
        writer.close()


def py_run(name: str, url: str, make_body, concurrency: int, duration: float, cpu: int | None = None) -> Result:
    """Fallback when wrk is not installed: raw HTTP/1.1 keep-alive over asyncio streams, in this
    process (pinned to ``cpu`` for the run when one is given; the servers were started before, so
    they keep their own CPUs)."""
    import numpy as np

    host, port = re.match(r"http://([^:/]+):(\d+)", url).groups()  # type: ignore[union-attr]
    lat: list[float] = []
    errs: list[int] = []

    async def main() -> float:
        t0 = time.perf_counter()
        deadline = t0 + duration
        await asyncio.gather(*(_py_worker(host, int(port), make_body, deadline, lat, errs) for _ in range(concurrency)))
        return time.perf_counter() - t0

    allowed = os.sched_getaffinity(0)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        secs = asyncio.run(main())
    finally:
        os.sched_setaffinity(0, allowed)
    a = np.asarray(lat) * 1000
    return Result(name, concurrency, len(lat), secs, len(lat) / secs, float(np.percentile(a, 50)),
                  float(np.percentile(a, 90)), float(np.percentile(a, 99)), len(errs), "python-asyncio")


def load(name: str, url: str, concurrency: int, duration: float, *, fixed: bytes | None = None,
         n_items: int = 0, seed: int = 0, driver: str = "wrk", cpu: int | None = None) -> Result:
    if driver == "wrk":
        lua = _LUA_FIXED % fixed.decode() if fixed is not None else _LUA_UNIQUE % (n_items, seed, K)
        return wrk_run(name, url, lua, concurrency, duration, cpu)
    rnd = random.Random(seed)
    if fixed is not None:
        def make_body() -> bytes:
            return fixed
    else:
        def make_body() -> bytes:
            return json.dumps({"history": [rnd.randint(1, n_items) for _ in range(5)], "k": K}).encode()
    return py_run(name, url, make_body, concurrency, duration, cpu)


def driver_cpu(choice: str) -> int | None:
    """The CPU the load driver is pinned to: ``auto`` = the highest-numbered CPU this process may
    use, when it may use at least 2 (else none); ``none`` = not pinned; or a CPU number."""
    allowed = sorted(os.sched_getaffinity(0))
    if choice == "none":
        return None
    if choice == "auto":
        return allowed[-1] if len(allowed) >= 2 else None
    cpu = int(choice)
    if cpu not in allowed:
        raise SystemExit(f"--driver-cpu {cpu}: not one of this process's CPUs {allowed}")
    return cpu


# --------------------------------------------------------------------------------------------
# report


def write_report(out: Path, results: list[Result], meta: dict[str, Any]) -> None:
    """Markdown table of the per-scenario medians over the rounds, plus the raw rounds in JSON."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2))
    med = _medians(results)
    bare = {c: r for (name, _mb, _w, c, _pin), r in med.items() if name == "bare"}
    pin = meta.get("driver_cpu")
    placement = (f"pinned to CPU {pin} (the servers may use every CPU, so the scheduler runs them beside the "
                 "driver, not under it), except in the rows whose `driver CPU` says `any`, where it shares the "
                 "cores with the servers as the scheduler likes" if pin is not None
                 else "on the same cores as the servers (not pinned)")
    b = meta["bundle"]
    cal = meta.get("calibration_s") or []
    lines = [
        "## Serving (recall service vs a bare FastAPI endpoint)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['cpus']} CPUs ({meta['cpu_model']}), Python {meta['python']}. Load driver: **{meta['driver']}** "
        f"(one thread) {placement}; JSON access log on; Redis on localhost. Load average "
        f"before/after: {meta['loadavg_before']} / {meta['loadavg_after']}. The rows were run interleaved "
        f"({meta['rounds']} rounds of {meta['duration']:g} s each, medians shown) so they saw the same conditions. "
        "`server CPU/req` is user+sys CPU of the server's processes per answered request.",
        (f"Machine speed during the run: a fixed pure-Python loop took {cal[0]:.3f} s before and {cal[-1]:.3f} s after "
         "(lower is faster). This VM's speed drifts: the same loop has measured 0.115 to 0.20 s within one hour, and "
         "absolute latencies move with it; ratios between rows of one run do not." if cal else ""),
        f"Processes ran at niceness {meta.get('nice', 0)}.  \n"
        f"Index: {b['n_items']:,} items, dim {b['dim']}, `{b['recipe']['factory']}` nprobe={b['recipe'].get('nprobe')} "
        f"(recall@{b['recall_k']} {b['recall']:.3f} against exact search for the bundle's users, measured by the "
        f"reindex job; {_load_recall(b)} for the uncached load's random 5-item histories), k={K}.",
        "",
        "| scenario | micro-batching | workers | driver CPU | conc. | req/s | p50 ms | p90 ms | p99 ms "
        "| server CPU/req ms | vs bare req/s | vs bare CPU/req | mean batch | CPU steal % | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (name, mb, w, c, pinned), r in med.items():
        ref = bare.get(c)
        ratio = f"{r.rps / ref.rps:.2f}" if ref is not None and name != "bare" else "-"
        cpu = r.extra.get("cpu_ms")
        ref_cpu = ref.extra.get("cpu_ms") if ref is not None else None
        cpu_ratio = f"{ref_cpu / cpu:.2f}" if cpu and ref_cpu and name != "bare" else "-"
        batch = f"{r.extra['mean_batch']:.1f}" if r.extra.get("mean_batch") else "-"
        cpu_s = f"{cpu:.3f}" if cpu is not None else "-"
        where = r.extra.get("driver_cpu") if pinned else "any"
        lines.append(f"| {name} | {'-' if mb is None else ('on' if mb else 'off')} | {w} | {where} | {c} | {r.rps:,.0f} | "
                     f"{r.p50_ms:.2f} | {r.p90_ms:.2f} | {r.p99_ms:.2f} | {cpu_s} | {ratio} | {cpu_ratio} | "
                     f"{batch} | {_pct(r.extra.get('steal_pct'))} | {r.errors} |")
    lines += ["", "`vs bare CPU/req` is bare's CPU per request divided by the scenario's: the req/s ratio one "
              "server core would reach if nothing else ran. `mean batch`: users per tower forward and index "
              "search (read from /metrics; not shown for 2 workers, whose metrics are per process). `CPU steal`: "
              "share of the machine's CPU time the hypervisor gave to other guests while this VM wanted it, "
              "during the run (/proc/stat); a few percent of steal shows up in p99 as stalls of several ms.", "",
              "Targets: cached recall >= 0.8x the bare endpoint's req/s; uncached p99 <= 10 ms at concurrency 8.", ""]
    for (name, mb, w, c, pinned), r in med.items():
        ref = bare.get(c)
        tag = (f"micro-batching {'on' if mb else 'off'}, {w} worker{'s' if w > 1 else ''}, c={c}"
               + ("" if pinned or pin is None else ", driver on any CPU"))
        if name == "cached" and ref is not None:
            cpu_r = ref.extra["cpu_ms"] / r.extra["cpu_ms"] if r.extra.get("cpu_ms") and ref.extra.get("cpu_ms") else None
            lines.append(f"- cached, {tag}: {r.rps / ref.rps:.2f}x bare req/s"
                         + (f", {cpu_r:.2f}x by CPU per request" if cpu_r else "")
                         + f" -> {'met' if r.rps >= 0.8 * ref.rps else 'NOT met'}")
        elif name == "uncached" and c == 8:
            rounds = [x for x in results if x.name == "uncached" and x.concurrency == 8
                      and x.extra.get("microbatch") == mb and int(x.extra.get("workers") or 1) == w
                      and (x.extra.get("driver_cpu") is not None) == pinned]
            lines.append(f"- uncached, {tag}: p99 {r.p99_ms:.2f} ms (rounds: "
                         + ", ".join(f"{x.p99_ms:.2f}" + (f" at {x.extra['steal_pct']:.1f}% steal"
                                                          if x.extra.get("steal_pct") is not None else "")
                                     for x in rounds)
                         + f") -> {'met' if r.p99_ms <= 10 else 'NOT met'} "
                         f"(server CPU {r.extra.get('cpu_ms', float('nan')):.2f} ms per request)")
    lines += ["", "How the cached path gets there: an answer repeated within `TT_LOCAL_CACHE_TTL_S` comes from "
              "this process's memory (no Redis round trip); a user's in-memory answers are dropped when an event "
              "for them is recorded (in this process at once, in others through a Redis notice). A well-formed "
              "`POST /v1/recall` is answered by the service's fast path (service/fastpath.py: the same JSON "
              "parsing, pydantic model and answer, without FastAPI's routing and dependency machinery), which "
              "is why it can beat the bare FastAPI endpoint; malformed requests still get FastAPI's own errors.",
              "",
              "What an uncached recall costs, on one event loop: HTTP parsing and validation; one Redis round "
              "trip for the cache lookup, shared by every request of the same loop turn, pipelined through "
              "redis-py; the user tower (NumPy only: lookups, pooling, matrix products) and one FAISS search per "
              "micro-batch; filtering and rendering the answer; the cache write, queued behind the response. "
              "Micro-batches leave as soon as no announced request is on its way (no fixed wait) and are "
              "computed on the event loop itself (`TT_COMPUTE_THREADS=0`), which cost less CPU per request than "
              "handing batches to a thread that competes for the GIL. One process keeps one core busy; with 2 "
              "workers the second core serves too, at the price of half-size micro-batches (the service's "
              "supervisor hands each connection to the worker with the fewest, so each gets half of them).", ""]
    out.write_text("\n".join(line for line in lines if line is not None))


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _load_recall(b: dict[str, Any]) -> str:
    r = b.get("load_recall")
    return f"recall@{K} {r:.3f}" if isinstance(r, float) else "recall not measured"


Key = tuple[str, bool | None, int, int, bool]  # scenario, micro-batching, workers, concurrency, driver pinned


def _medians(results: list[Result]) -> dict[Key, Result]:
    import statistics

    groups: dict[Key, list[Result]] = {}
    for r in results:
        groups.setdefault((r.name, r.extra.get("microbatch"), int(r.extra.get("workers") or 1), r.concurrency,
                           r.extra.get("driver_cpu") is not None), []).append(r)
    order = {"bare": 0, "cached": 1, "uncached": 2}
    out: dict[Key, Result] = {}
    for key in sorted(groups, key=lambda k: (k[3], order[k[0]], not k[1], k[2], not k[4])):
        rs = groups[key]
        m = Result(key[0], key[3], int(statistics.median(r.requests for r in rs)),
                   statistics.median(r.seconds for r in rs), statistics.median(r.rps for r in rs),
                   statistics.median(r.p50_ms for r in rs), statistics.median(r.p90_ms for r in rs),
                   statistics.median(r.p99_ms for r in rs), sum(r.errors for r in rs), rs[0].driver,
                   {"microbatch": key[1], "workers": key[2], "rounds": len(rs), "driver_cpu": rs[0].extra.get("driver_cpu")})
        for field_name in ("cpu_ms", "mean_batch", "steal_pct"):
            vals = [r.extra[field_name] for r in rs if r.extra.get(field_name) is not None]
            if vals:
                m.extra[field_name] = statistics.median(vals)
        out[key] = m
    return out


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a server process and its live descendants (its workers)."""
    from tests.reliability.harness import cpu_seconds as own
    from tests.reliability.harness import tree_total

    return tree_total(own, pid)


def cpu_ticks() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs from /proc/stat: steal is time the hypervisor ran something
    else while this VM wanted the CPU. (0, 0) where there is no /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return (0, 0)
    return (fields[7] if len(fields) > 7 else 0, sum(fields[:8]))


def steal_pct(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    total = after[1] - before[1]
    return 100.0 * (after[0] - before[0]) / total if total > 0 else None


def calibrate() -> float:
    """Seconds for a fixed pure-Python loop (best of 3): how fast this machine is right now. The
    benchmark VM's speed has been seen to drift by 1.7x within an hour, so every report carries it."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        acc = 0
        for i in range(2_000_000):
            acc += i * i
        best = min(best, time.perf_counter() - t0)
    return round(best, 4)


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from towers.artifacts import DEFAULT_REDIS_URL

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = ap.add_subparsers(dest="cmd")
    b = sub.add_parser("_bare", help=argparse.SUPPRESS)
    b.add_argument("--port", type=int, required=True)
    b.add_argument("--answer", required=True)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per scenario and round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the report shows medians")
    ap.add_argument("--concurrency", default="8,32", help="comma-separated connection counts")
    ap.add_argument("--workers", default="2", help="comma-separated worker counts for an extra uncached, "
                                                   "micro-batched server each ('' for none)")
    ap.add_argument("--driver", choices=("auto", "wrk", "python"), default="auto")
    ap.add_argument("--driver-cpu", default="auto",
                    help="pin the load driver to this CPU (auto: the last one, when there are 2 or more; none: "
                         "don't); the servers stay free to use every CPU. One extra uncached row runs unpinned")
    ap.add_argument("--workdir", default=str(ROOT / ".bench"), help="where the benchmark bundle is cached")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the bundle even if one is cached")
    ap.add_argument("--redis-url", default=os.environ.get("TT_REDIS_URL") or DEFAULT_REDIS_URL)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.md"))
    ap.add_argument("--from-json", default=None, help="only re-render the report from a saved .json")
    ap.add_argument("--nice", type=int, default=0,
                    help="niceness for this run, inherited by the servers and the driver (negative needs root): "
                         "on a machine shared with other jobs, -10 keeps them from dominating the numbers")
    args = ap.parse_args(argv)
    if args.cmd == "_bare":
        run_bare(args.port, args.answer)
        return 0
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        write_report(Path(args.out), [Result(**r) for r in saved["results"]], saved["meta"])
        print(f"wrote {args.out}")
        return 0
    if args.nice:
        try:
            os.nice(args.nice)
        except OSError as exc:
            print(f"warning: cannot change niceness by {args.nice}: {exc}", file=sys.stderr)

    driver = ("wrk" if shutil.which("wrk") else "python") if args.driver == "auto" else args.driver
    pin = driver_cpu(args.driver_cpu)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    artifacts = Path(args.workdir) / f"serve-{args.items}"
    if args.rebuild and artifacts.exists():
        shutil.rmtree(artifacts)
    if not (artifacts / "bundles" / "CURRENT").exists():
        artifacts.mkdir(parents=True, exist_ok=True)
        print(f"building a {args.items:,}-item bundle under {artifacts} (cached for later runs)...", flush=True)
        info = build_bench_bundle(artifacts, args.items)
        (artifacts / "bench-bundle.json").write_text(json.dumps(info, indent=2, default=str))
    info = json.loads((artifacts / "bench-bundle.json").read_text())
    print(f"bundle: {info['n_items']:,} items, {info['recipe']}, recall {info['recall']:.3f}", flush=True)

    import httpx

    load_before = [round(x, 2) for x in os.getloadavg()]
    calibration = [calibrate()]
    prefix = f"tt-bench-{uuid.uuid4().hex[:8]}"
    logdir = Path(tempfile.mkdtemp(prefix="tt-bench-"))
    known_user = {"user_id": "1", "k": K}
    fixed = json.dumps(known_user).encode()
    extra_workers = [int(w) for w in args.workers.split(",") if w.strip() and int(w) > 1]
    results: list[Result] = []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # every server up at once (idle ones cost nothing), then the scenarios interleaved per round;
        # a target: (process, port, micro-batching, workers, scenarios)
        targets: list[tuple[subprocess.Popen[bytes], int, bool | None, int, list[str]]] = []
        for mb, workers, scen in [(True, 1, ["cached", "uncached"]), (False, 1, ["cached", "uncached"]),
                                  *[(True, w, ["uncached"]) for w in extra_workers]]:
            port = free_port()
            proc = start_service(artifacts, port, args.redis_url, f"{prefix}-{int(mb)}-{workers}", mb,
                                 logdir / f"service-{int(mb)}-{workers}.log", workers=workers)
            procs.append(proc)
            targets.append((proc, port, mb, workers, scen))
        answer = httpx.post(f"http://127.0.0.1:{targets[0][1]}/v1/recall", json=known_user, timeout=30).content
        bare_port = free_port()
        bare = start_bare(bare_port, answer)
        procs.append(bare)
        targets.append((bare, bare_port, None, 1, ["bare"]))
        for _p, port, mb, _w, _s in targets:
            if mb is not None:  # warm-up: first forward passes, connection pools, FAISS pages
                load("warmup", f"http://127.0.0.1:{port}/v1/recall", 8, 2, n_items=args.items, seed=99, driver=driver,
                     cpu=pin)
        for c in concurrencies:
            for rnd in range(args.rounds):
                for proc, port, mb, workers, scen in targets:
                    url = f"http://127.0.0.1:{port}/v1/recall"
                    runs = [(sname, pin) for sname in scen]
                    if pin is not None and mb and workers == 1:  # the same load with the driver free to roam
                        runs.append(("uncached", None))
                    for sname, cpu in runs:
                        kw: dict[str, Any] = {"fixed": fixed} if sname != "uncached" else \
                            {"n_items": args.items, "seed": 1000 * c + 10 * rnd + workers + (500 if cpu is None else 0)}
                        per_process = mb is not None and workers == 1  # /metrics of one process is the whole
                        before = _batch_totals(f"http://127.0.0.1:{port}/metrics") if per_process else (0.0, 0.0)
                        cpu0, ticks0 = cpu_seconds(proc.pid), cpu_ticks()
                        r = load(sname, url, c, args.duration, driver=driver, cpu=cpu, **kw)
                        cpu1, ticks1 = cpu_seconds(proc.pid), cpu_ticks()
                        r.extra.update(microbatch=mb, workers=workers, round=rnd, driver_cpu=cpu,
                                       steal_pct=steal_pct(ticks0, ticks1))
                        if r.requests:
                            r.extra["cpu_ms"] = (cpu1 - cpu0) * 1000 / r.requests
                        if per_process:
                            after = _batch_totals(f"http://127.0.0.1:{port}/metrics")
                            if sname == "uncached" and after[1] > before[1]:
                                r.extra["mean_batch"] = (after[0] - before[0]) / (after[1] - before[1])
                        results.append(r)
                        mbs = "   " if mb is None else ("on " if mb else "off")
                        print(f"round {rnd} {sname:9s} mb={mbs} w={workers} c={c:3d} driver on "
                              f"{'any CPU' if cpu is None else f'CPU {cpu}'}: {r.rps:8.0f} req/s  "
                              f"p50 {r.p50_ms:6.2f}  p99 {r.p99_ms:7.2f} ms  cpu/req {r.extra.get('cpu_ms', 0):.3f} ms  "
                              f"steal {r.extra.get('steal_pct') or 0:.1f}%  errors {r.errors}", flush=True)
    finally:
        for p in procs:
            stop(p)
        _drop_keys(args.redis_url, prefix)
    calibration.append(calibrate())
    meta = {
        "loadavg_before": load_before, "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "command": "python benchmarks/serve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpus": os.cpu_count(), "cpu_model": _cpu_model(), "python": platform.python_version(), "driver": driver,
        "driver_cpu": pin,
        "duration": args.duration, "rounds": args.rounds, "bundle": info, "nice": os.nice(0),
        "calibration_s": calibration,
    }
    write_report(Path(args.out), results, meta)
    print(f"wrote {args.out}")
    return 0


def _batch_totals(url: str) -> tuple[float, float]:
    import httpx

    text = httpx.get(url, timeout=5).text
    s = re.search(r"^tt_microbatch_size_sum (\S+)$", text, re.M)
    c = re.search(r"^tt_microbatch_size_count (\S+)$", text, re.M)
    return (float(s.group(1)) if s else 0.0, float(c.group(1)) if c else 0.0)


def _drop_keys(url: str, prefix: str) -> None:
    try:
        import redis

        r = redis.Redis.from_url(url)
        keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
        for i in range(0, len(keys), 1000):
            r.delete(*keys[i:i + 1000])
    except Exception as exc:  # a benchmark must still write its report
        print(f"warning: could not clean Redis keys {prefix}*: {exc}", file=sys.stderr)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
