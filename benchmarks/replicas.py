"""Serving past one process: replicas behind haproxy against one replica, in the same run.

Uncached recalls (every request a fresh 5-item history: user tower + FAISS search + cache write) over
the serve benchmark's bundle (``--items``, default 1M, built once by benchmarks/serve.py's code and
cached under .bench/). Scenarios, interleaved round by round so they see the same machine:

- ``1 replica``: one `twotower serve` process, the load sent to it directly;
- ``1 replica + lb``: the same process behind haproxy (what the balancer itself costs);
- ``2 replicas + lb``: two processes behind haproxy, configured as docker/haproxy.cfg configures it
  in the compose stack (leastconn, /readyz health checks, retries), with the two servers listed
  statically instead of found through Docker's DNS;
- ``supervisor, 2 workers``: `TT_WORKERS=2`, the in-process supervisor (service/balancer.py), where
  the service still has it.

The load driver (wrk, one thread) is pinned to the last CPU as in benchmarks/serve.py; everything
else (replicas, haproxy, Redis) runs where the scheduler puts it, on the same 2 cores.

    python benchmarks/replicas.py                    # concurrency 8 and 32, 3 rounds of 10 s
Writes benchmarks/results/replicas.md (and .json beside it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import serve as sb  # noqa: E402  (the serve benchmark's bundle, servers and load drivers)

HAPROXY_CFG = ROOT / "docker" / "haproxy.cfg"


def haproxy_config(port: int, stats_port: int, servers: list[int]) -> str:
    """docker/haproxy.cfg with the replicas listed by address instead of resolved through Docker's
    DNS, and the listeners on loopback ports. Every balancing and health setting stays as it is."""
    text = HAPROXY_CFG.read_text()
    text = re.sub(r"^resolvers docker\n(?:[ \t]+.*\n)+", "", text, flags=re.M)
    text = re.sub(r" resolvers docker init-addr none resolve-prefer ipv4", "", text)
    lines = "\n".join(f"    server r{i} 127.0.0.1:{p}" for i, p in enumerate(servers))
    text, n = re.subn(r"^    server-template api .*$", lines, text, flags=re.M)
    assert n == 1, "docker/haproxy.cfg has no server-template line to replace"
    text, n1 = re.subn(r"bind :8000\b", f"bind 127.0.0.1:{port}", text)
    text, n2 = re.subn(r"bind :8404\b", f"bind 127.0.0.1:{stats_port}", text)
    assert n1 == n2 == 1, "docker/haproxy.cfg binds elsewhere than :8000 and :8404"
    return text


def start_haproxy(cfg: str, workdir: Path, port: int) -> subprocess.Popen[bytes]:
    exe = shutil.which("haproxy")
    if exe is None:
        raise SystemExit("haproxy is not installed (Debian: apt-get install haproxy)")
    path = workdir / "haproxy.cfg"
    path.write_text(cfg)
    check = subprocess.run([exe, "-c", "-f", str(path)], capture_output=True, text=True)
    if check.returncode != 0:
        raise SystemExit(f"haproxy refuses the config:\n{check.stdout}{check.stderr}")
    proc = subprocess.Popen([exe, "-db", "-f", str(path)], stdout=subprocess.DEVNULL,
                            stderr=(workdir / "haproxy.log").open("wb"))
    sb.wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
    return proc


def lb_servers_up(stats_port: int, want: int, timeout: float = 60.0) -> None:
    """Wait until haproxy's health checks have every replica UP (from its Prometheus exporter)."""
    import httpx

    deadline = time.monotonic() + timeout
    up = 0
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{stats_port}/metrics", timeout=2).text
        up = sum(1 for line in text.splitlines()
                 if line.startswith("haproxy_server_status{") and 'state="UP"' in line and line.endswith(" 1"))
        if up >= want:
            return
        time.sleep(0.2)
    raise TimeoutError(f"haproxy sees {up} of {want} replicas up after {timeout}s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per scenario and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", default="8,32")
    ap.add_argument("--driver-cpu", default="auto", help="as in benchmarks/serve.py")
    ap.add_argument("--supervisor", choices=("auto", "yes", "no"), default="auto",
                    help="include TT_WORKERS=2 (auto: when service/balancer.py exists)")
    ap.add_argument("--workdir", default=str(ROOT / ".bench"))
    ap.add_argument("--redis-url", default=os.environ.get("TT_REDIS_URL") or "redis://127.0.0.1:6379/0")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "replicas.md"))
    ap.add_argument("--from-json", default=None, help="only re-render the report from a saved .json")
    args = ap.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        Path(args.out).write_text(render(saved["results"], saved["meta"]))
        return 0
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")
    supervisor = (importlib.util.find_spec("service.balancer") is not None if args.supervisor == "auto"
                  else args.supervisor == "yes")
    pin = sb.driver_cpu(args.driver_cpu)
    artifacts = Path(args.workdir) / f"serve-{args.items}"
    if not (artifacts / "bundles" / "CURRENT").exists():
        artifacts.mkdir(parents=True, exist_ok=True)
        print(f"building a {args.items:,}-item bundle under {artifacts} (cached for later runs)...", flush=True)
        info = sb.build_bench_bundle(artifacts, args.items)
        (artifacts / "bench-bundle.json").write_text(json.dumps(info, indent=2, default=str))
    info = json.loads((artifacts / "bench-bundle.json").read_text())
    print(f"bundle: {info['n_items']:,} items, {info['recipe']}, recall {info['recall']:.3f}", flush=True)

    prefix = f"tt-bench-rep-{uuid.uuid4().hex[:8]}"
    logdir = Path(tempfile.mkdtemp(prefix="tt-bench-rep-"))
    load_before = [round(x, 2) for x in os.getloadavg()]
    calibration = [sb.calibrate()]
    results: list[dict[str, Any]] = []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ports = [sb.free_port(), sb.free_port()]
        replicas = [sb.start_service(artifacts, p, args.redis_url, f"{prefix}-{i}", True, logdir / f"replica-{i}.log")
                    for i, p in enumerate(ports)]
        procs += replicas
        lb1_port, lb1_stats, lb2_port, lb2_stats = (sb.free_port() for _ in range(4))
        (logdir / "lb1").mkdir()
        (logdir / "lb2").mkdir()
        lb1 = start_haproxy(haproxy_config(lb1_port, lb1_stats, ports[:1]), logdir / "lb1", lb1_port)
        lb2 = start_haproxy(haproxy_config(lb2_port, lb2_stats, ports), logdir / "lb2", lb2_port)
        procs += [lb1, lb2]
        lb_servers_up(lb1_stats, 1)
        lb_servers_up(lb2_stats, 2)
        # (name, port the load goes to, processes whose CPU counts)
        scenarios: list[tuple[str, int, list[subprocess.Popen[bytes]]]] = [
            ("1 replica", ports[0], replicas[:1]),
            ("1 replica + lb", lb1_port, [replicas[0], lb1]),
            ("2 replicas + lb", lb2_port, [*replicas, lb2]),
        ]
        if supervisor:
            sup_port = sb.free_port()
            sup = sb.start_service(artifacts, sup_port, args.redis_url, f"{prefix}-sup", True,
                                   logdir / "supervisor.log", workers=2)
            procs.append(sup)
            scenarios.append(("supervisor, 2 workers", sup_port, [sup]))
        for _name, port, _ in scenarios:  # warm-up
            sb.load("warmup", f"http://127.0.0.1:{port}/v1/recall", 8, 2, n_items=args.items, seed=99, driver="wrk",
                    cpu=pin)
        for c in (int(x) for x in args.concurrency.split(",")):
            for rnd in range(args.rounds):
                for i, (name, port, counted) in enumerate(scenarios):
                    cpu0 = sum(sb.cpu_seconds(p.pid) for p in counted)
                    ticks0 = sb.cpu_ticks()
                    r = sb.load("uncached", f"http://127.0.0.1:{port}/v1/recall", c, args.duration, n_items=args.items,
                                seed=100_000 * c + 1000 * rnd + i, driver="wrk", cpu=pin)
                    cpu1 = sum(sb.cpu_seconds(p.pid) for p in counted)
                    row = {"scenario": name, "concurrency": c, "round": rnd, "requests": r.requests, "rps": r.rps,
                           "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "errors": r.errors,
                           "cpu_ms": (cpu1 - cpu0) * 1000 / max(1, r.requests),
                           "steal_pct": sb.steal_pct(ticks0, sb.cpu_ticks())}
                    results.append(row)
                    print(f"round {rnd} c={c:3d} {name:22s} {r.rps:7.0f} req/s  p50 {r.p50_ms:6.2f}  p99 {r.p99_ms:7.2f} ms"
                          f"  cpu/req {row['cpu_ms']:.3f} ms  errors {r.errors}", flush=True)
    finally:
        for p in procs:
            sb.stop(p)
        sb._drop_keys(args.redis_url, prefix)
    calibration.append(sb.calibrate())
    meta = {"command": "python benchmarks/replicas.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "cpus": os.cpu_count(), "cpu_model": sb._cpu_model(), "python": platform.python_version(),
            "haproxy": subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.split("\n")[0],
            "driver_cpu": pin, "duration": args.duration, "rounds": args.rounds, "bundle": info,
            "loadavg_before": load_before, "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "calibration_s": calibration}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    out.write_text(render(results, meta))
    print(f"wrote {out}")
    return 0


def render(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    b = meta["bundle"]
    lines = ["## Replicas behind a load balancer (uncached recall)", "",
             f"Command: `{meta['command'].strip()}`  ",
             f"Machine: {meta['cpus']} CPUs ({meta['cpu_model']}), Python {meta['python']}, {meta['haproxy']}. "
             f"Load driver: wrk, one thread, pinned to CPU {meta['driver_cpu']}; the servers, haproxy and Redis share "
             f"the same cores. {meta['rounds']} interleaved rounds of {meta['duration']:.0f} s, medians shown. "
             f"Load average before/after: {meta['loadavg_before']} / {meta['loadavg_after']}; machine-speed loop "
             f"{meta['calibration_s'][0]} s before, {meta['calibration_s'][-1]} s after.  ",
             f"Index: {b['n_items']:,} items, dim {b['dim']}, `{b['recipe'].get('factory')}` "
             f"nprobe={b['recipe'].get('nprobe')}; every request a fresh 5-item history (a cache miss).", "",
             "| conc. | scenario | req/s | vs 1 replica | p50 ms | p99 ms | server CPU/req ms | steal % | errors |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    med: dict[tuple[int, str], dict[str, float]] = {}
    names = list(dict.fromkeys(r["scenario"] for r in results))
    for c in sorted({r["concurrency"] for r in results}):
        for name in names:
            rs = [r for r in results if r["concurrency"] == c and r["scenario"] == name]
            if not rs:
                continue
            med[(c, name)] = {k: statistics.median(r[k] for r in rs if r[k] is not None)
                              for k in ("rps", "p50_ms", "p99_ms", "cpu_ms", "steal_pct")}
            med[(c, name)]["errors"] = sum(r["errors"] for r in rs)
        base = med[(c, "1 replica")]["rps"]
        for name in names:
            m = med.get((c, name))
            if m is None:
                continue
            lines.append(f"| {c} | {name} | {m['rps']:,.0f} | {m['rps'] / base:.2f} | {m['p50_ms']:.2f} | "
                         f"{m['p99_ms']:.2f} | {m['cpu_ms']:.3f} | {m['steal_pct']:.1f} | {int(m['errors'])} |")
    lines += ["", "Target: 2 replicas behind the balancer >= 1.6x the req/s of 1 replica.", ""]
    for c in sorted({k[0] for k in med}):
        base = med[(c, "1 replica")]["rps"]
        two = med[(c, "2 replicas + lb")]["rps"]
        line = f"- concurrency {c}: 2 replicas + lb {two / base:.2f}x of 1 replica -> {'met' if two / base >= 1.6 else 'NOT met'}"
        if (c, "supervisor, 2 workers") in med:
            sup = med[(c, "supervisor, 2 workers")]["rps"]
            line += f"; supervisor 2 workers {sup / base:.2f}x; 2 replicas + lb / supervisor {two / sup:.2f}x"
        lines.append(line)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
