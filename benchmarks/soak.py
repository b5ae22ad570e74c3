"""Soak: a real server under a fixed concurrency for a fixed time; no errors, bounded memory.

    python benchmarks/soak.py --seconds 60 --concurrency 32 [--workers 2] [--json out.json]
    python benchmarks/soak.py --url http://127.0.0.1:8000 --pid 1234 ...   (an already running server)

Without ``--url`` it builds everything itself in a temporary directory and removes it afterwards:
a tiny synthetic training run (1 epoch) and its reindexed bundle, a private ``redis-server`` on a
free port (``--save "" --appendonly no``; none when redis-server is not installed: the in-process
cache then), and ``twotower serve`` on a free loopback port with the default settings.

The load is a mix of what clients send: known users (cache hits and misses), brand-new users
(popularity fallback), inline histories, batches of 8, similar items, exclusions and events (which
invalidate the user's cached answers). After ``--warmup`` seconds of the same load the server's
resident memory (VmRSS from /proc/<pid>/status) is taken as the start; the end is taken after the
last request. Exit status 0 when there were no errors and RSS grew by less than ``--max-growth``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python benchmarks/soak.py` puts benchmarks/ first, not the repo
    sys.path.insert(0, str(REPO))

from tests.reliability.harness import (  # noqa: E402
    Load,
    RedisProc,
    Req,
    ServerProc,
    cpu_seconds,
    rss_kib,
    tree_total,
)

N_USERS, N_ITEMS = 200, 120  # the "tiny" synthetic preset


def request_mix(seed: int = 0, n_users: int = N_USERS, n_items: int = N_ITEMS):
    """``make(i) -> (kind, Req)`` for Load: a fixed, seeded mix of every kind of request."""
    rng = random.Random(seed)
    lock = threading.Lock()

    def make(i: int) -> tuple[str, Req]:
        with lock:
            r = rng.random()
            u = rng.randint(1, n_users)
            it = rng.randint(1, n_items)
            hist = [rng.randint(1, n_items) for _ in range(rng.randint(1, 20))]
        if r < 0.45:
            return "recall", Req("POST", "/v1/recall", {"user_id": u, "k": 50})
        if r < 0.55:
            return "cold", Req("POST", "/v1/recall", {"user_id": f"soak-new-{i}", "k": 20})
        if r < 0.65:
            return "history", Req("POST", "/v1/recall", {"history": hist, "k": 20})
        if r < 0.75:
            return "batch", Req("POST", "/v1/recall/batch",
                                {"requests": [{"user_id": (u + j) % n_users + 1, "k": 20} for j in range(8)]})
        if r < 0.85:
            return "similar", Req("GET", f"/v1/items/{it}/similar?k=10")
        if r < 0.95:
            return "exclude", Req("POST", "/v1/recall", {"user_id": u, "k": 20, "exclude_ids": hist})
        return "event", Req("POST", "/v1/events", {"user_id": u, "item_id": it})

    return make


def soak(url: str, pid: int, *, seconds: float, concurrency: int, warmup: float = 5.0,
         seed: int = 0) -> dict[str, Any]:
    """Warm up, take RSS, hold the load for ``seconds``, take RSS again. Returns the figures (memory
    and CPU of the server process and its workers together)."""
    make = request_mix(seed)
    warm = Load(url, make, concurrency=concurrency, max_requests=10**7, max_seconds=warmup, keep=False).run()
    rss_start = int(tree_total(rss_kib, pid))
    cpu_start = tree_total(cpu_seconds, pid)
    samples: list[int] = []
    load = Load(url, make, concurrency=concurrency, max_requests=10**7, max_seconds=seconds, keep=False).start()
    while load.running:  # sample memory while the load runs
        samples.append(int(tree_total(rss_kib, pid)))
        time.sleep(0.5)
    load.join()
    rss_end = int(tree_total(rss_kib, pid))
    cpu = tree_total(cpu_seconds, pid) - cpu_start
    s = load.summary()
    growth = (rss_end - rss_start) / rss_start
    return {
        **s,
        "failures": [f"{o.kind}: {o.status or ''} {o.error or o.body_4xx or ''}"[:300] for o in load.outcomes[:10]],
        "warmup_requests": warm.sent,
        "warmup_errors": warm.errors(),
        "rss_start_kib": rss_start,
        "rss_end_kib": rss_end,
        "rss_max_kib": max(samples + [rss_end]),
        # eleven evenly spaced samples across the run: growth that has levelled off vs one that has not
        "rss_trend_kib": [samples[round(i * (len(samples) - 1) / 10)] for i in range(11)] if samples else [],
        "rss_growth_pct": round(100.0 * growth, 2),
        # on a shared machine latency says more about the neighbours than about the server; the
        # server's own CPU time per request does not
        "server_cpu_s": round(cpu, 2),
        "server_cpu_ms_per_request": round(1000.0 * cpu / max(1, s["requests"]), 3),
    }


def build_artifacts(root: Path) -> Path:
    """A tiny synthetic training run and its bundle (the pipeline a deployment runs, only smaller)."""
    from index.reindex import ReindexConfig
    from index.reindex import run as reindex
    from training.config import TrainConfig
    from training.train import run as train

    art = root / "artifacts"
    train(TrainConfig(data="synthetic", data_options={"size": "tiny"}, artifacts=str(art), dim=32, hidden=(64,),
                      epochs=1, batch_size=256, num_negatives=64, quiet=True, num_threads=1))
    reindex(ReindexConfig(artifacts=art, threads=1, n_eval_users=100))
    return art


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=60.0, help="length of the measured load (default 60)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at once (default 32)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of load before RSS is taken (default 5)")
    p.add_argument("--max-growth", type=float, default=0.10, help="fail above this RSS growth (default 0.10)")
    p.add_argument("--url", help="soak a running server instead of starting one (needs --pid)")
    p.add_argument("--pid", type=int, help="pid of that server (for its memory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="TT_WORKERS of the server it starts (default 1)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if (args.url is None) != (args.pid is None):
        p.error("--url and --pid go together")
    logging.basicConfig(level=logging.WARNING)

    with ExitStack() as stack:
        url, pid = args.url, args.pid
        setup: dict[str, Any] = {}
        if url is None:
            root = Path(tempfile.mkdtemp(prefix="tt-soak-"))
            stack.callback(shutil.rmtree, root, ignore_errors=True)
            t0 = time.monotonic()
            art = build_artifacts(root)
            redis_url = ""
            if shutil.which("redis-server"):
                redis = RedisProc(root / "redis").start()
                stack.callback(redis.kill)
                redis_url = redis.url
            srv = ServerProc(art, root / "server.log", redis_url=redis_url, prefix="tt-soak",
                             env={"TT_LOG_LEVEL": "WARNING", "TT_RELOAD_POLL_S": "5", "TT_WORKERS": str(args.workers)})
            srv.start()
            stack.callback(srv.stop)
            url, pid = srv.url, srv.pid
            setup = {"setup_s": round(time.monotonic() - t0, 1), "redis": redis_url or "none (in-process cache)",
                     "workers": args.workers}
        res = soak(url, pid, seconds=args.seconds, concurrency=args.concurrency, warmup=args.warmup, seed=args.seed)
        res.update(setup)
        if args.url is None:
            res["server_exit_code"] = srv.stop()
    ok = not res["errors"] and res["rss_growth_pct"] < 100.0 * args.max_growth
    res["passed"] = ok
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
