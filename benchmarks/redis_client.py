"""Redis client A/B for the request path: the project's own pipelining RESP client (service/resp.py)
against redis-py's asyncio client with the hiredis parser, in the same run.

What one "request" does here is what an uncached recall of a known user sends to Redis:
- the cache lookup: MGET of the answer's key and the user's event counter;
- the event read: LRANGE + SMEMBERS + GET of the user's history, in one MULTI/EXEC;
- the cache write of the fresh answer: SET ... EX (queued behind the response, awaited at the end).
Both clients go through the service's own ``RedisCoalescer`` and ``RedisEventStore``, so
commands issued in the same event-loop turn share one round trip, exactly as in the service.

Measured per client and concurrency (tasks issuing requests back to back), in interleaved rounds:
requests per second and this process's CPU per request (the client's cost; Redis's own CPU is the
same for both). Uses the Redis at --redis-url (keys under a random prefix, deleted afterwards).

    python benchmarks/redis_client.py                      # concurrency 1 and 32, 3 rounds of 3 s
Writes benchmarks/results/redis_client.md (and .json beside it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

N_USERS = 1000
ANSWER = b"7\n" + b'{"items":[' + b",".join(b'{"item_id":%d,"score":0.5}' % i for i in range(100)) + b"]}"


async def _setup(url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url)
    async with r.pipeline(transaction=False) as p:
        for u in range(N_USERS):
            p.rpush(f"{prefix}:v1:events:{u}", *[f"{1_600_000_000 + i} {i}" for i in range(20)])
            p.sadd(f"{prefix}:v1:seen:{u}", *[str(i) for i in range(20)])
            p.set(f"{prefix}:v1:evseq:{u}", 7)
        await p.execute()
    await r.aclose()


async def _run(client: str, url: str, prefix: str, concurrency: int, seconds: float) -> dict[str, Any]:
    from service.events import RedisEventStore
    from service.redisconn import RedisCoalescer, RedisGuard, make_client
    from service.resp import RespClient

    guard = RedisGuard(make_client(url, 1.0))
    coalescer = RedisCoalescer(guard, RespClient(url, 1.0) if client == "resp" else None)
    events = RedisEventStore(guard, prefix, 500, 0, redis=coalescer)
    done = 0
    writes: list[asyncio.Future[Any]] = []
    run_id = uuid.uuid4().hex[:8]  # every run writes answers under keys of its own: each lookup misses

    async def one(i: int) -> None:
        uid = str(i % N_USERS)
        key = f"{prefix}:v1:rec:{run_id}:{i}"
        raw, seq = await coalescer.mget(key, f"{prefix}:v1:evseq:{uid}")
        assert raw is None and int(seq) == 7, (client, raw, seq)
        ev = await events.read(uid)
        assert len(ev.items) == 20 and ev.seq == 7
        writes.append(coalescer.set(key, ANSWER, 60))

    async def worker(w: int, deadline: float) -> None:
        nonlocal done
        i = w
        while time.perf_counter() < deadline:
            await one(i)
            done += 1
            i += concurrency

    for w in range(concurrency):  # warm-up: connections open, code paths taken
        await one(10_000_000 + w)
    done = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(w, t0 + seconds) for w in range(concurrency)))
    await asyncio.gather(*writes)
    cpu1, t1 = time.process_time(), time.perf_counter()
    await coalescer.aclose()
    await guard.close()
    return {"client": client, "concurrency": concurrency, "requests": done, "seconds": t1 - t0,
            "rps": done / (t1 - t0), "cpu_us": (cpu1 - cpu0) * 1e6 / max(1, done)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--redis-url", default=os.environ.get("TT_REDIS_URL") or "redis://127.0.0.1:6379/0")
    ap.add_argument("--concurrency", default="1,32")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "redis_client.md"))
    args = ap.parse_args(argv)

    import redis
    from redis.utils import HIREDIS_AVAILABLE

    try:
        import uvloop
        runner = uvloop.run
        loop_name = "uvloop"
    except ImportError:
        runner = asyncio.run
        loop_name = "asyncio"
    prefix = f"tt-bench-redis-{uuid.uuid4().hex[:8]}"
    runner(_setup(args.redis_url, prefix))
    results: list[dict[str, Any]] = []
    try:
        for c in (int(x) for x in args.concurrency.split(",")):
            for rnd in range(args.rounds):
                for client in ("resp", "redis-py"):
                    r = runner(_run(client, args.redis_url, prefix, c, args.seconds))
                    r["round"] = rnd
                    results.append(r)
                    print(f"round {rnd} {client:8s} c={c:3d}: {r['rps']:8.0f} req/s  {r['cpu_us']:6.1f} us CPU/req",
                          flush=True)
    finally:
        r = redis.Redis.from_url(args.redis_url)
        keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
        for i in range(0, len(keys), 1000):
            r.delete(*keys[i:i + 1000])
    meta = {"command": "python benchmarks/redis_client.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "redis_py": redis.__version__, "hiredis": HIREDIS_AVAILABLE, "loop": loop_name,
            "python": platform.python_version(), "cpus": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()]}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    out.write_text(render(results, meta))
    print(f"wrote {out}")
    return 0


def render(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["## Redis client on the request path (service/resp.py vs redis-py + hiredis)", "",
             f"Command: `{meta['command'].strip()}`  ",
             f"redis-py {meta['redis_py']}, hiredis parser {'on' if meta['hiredis'] else 'OFF'}, event loop "
             f"{meta['loop']}, Python {meta['python']}, {meta['cpus']} CPUs, load average {meta['loadavg']}. "
             "One request = what an uncached recall of a known user sends: MGET (answer + event counter), "
             "MULTI LRANGE SMEMBERS GET EXEC (the user's events), SET EX (the fresh answer), through the "
             "service's RedisCoalescer (commands of one loop turn share a round trip). Medians of the rounds; "
             "CPU is this process's (the client's) per request.", "",
             "| concurrency | client | req/s | CPU us/req | rounds |", "|---:|---|---:|---:|---:|"]
    med: dict[tuple[int, str], tuple[float, float]] = {}
    for c in sorted({r["concurrency"] for r in results}):
        for client in ("resp", "redis-py"):
            rs = [r for r in results if r["concurrency"] == c and r["client"] == client]
            m = (statistics.median(r["rps"] for r in rs), statistics.median(r["cpu_us"] for r in rs))
            med[(c, client)] = m
            lines.append(f"| {c} | {client} | {m[0]:,.0f} | {m[1]:.1f} | {len(rs)} |")
    lines.append("")
    for c in sorted({k[0] for k in med}):
        a, b = med[(c, "resp")], med[(c, "redis-py")]
        lines.append(f"- concurrency {c}: redis-py does {b[0] / a[0]:.2f}x the requests per second of resp.py and "
                     f"costs {b[1] / a[1]:.2f}x its CPU per request")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
