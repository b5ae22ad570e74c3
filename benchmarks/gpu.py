"""What a GPU machine measures, in one go:  python benchmarks/gpu.py [--out benchmarks/results/gpu.md]

Written to run unattended on a CUDA machine with this repository and its venv (`make venv`, then
`pip install '.[gpu]'` and `pip uninstall -y faiss-cpu` for FAISS on the GPU, as docker/Dockerfile.gpu
does). Each part records its error and the next one runs, so one missing piece does not lose the rest.

1. Training throughput: ``twotower train --device cuda`` streaming synthetic Parquet parts
   (``write_synthetic_parts``; default 1M users, 1M items, 5 interactions per user) for a fixed budget
   of optimiser steps: examples/s, peak GPU memory; with 2+ GPUs also one process per GPU under
   torchrun (``--nproc``: NCCL for the dense gradients, a gloo group for the id tables' sparse ones).
2. Exact search: the project's ``ExactSearcher`` (torch matmul + top-k) over 1M items x 64 dims on the
   GPU, batches of 1024 queries, top 100: ms per batch and queries/s, fp32 and fp16 (fp16's
   recall@100 against fp32), and the bare matmul + topk kept on the device beside it.
3. FAISS on the GPU, where faiss-gpu loads: exact ``GpuIndexFlatIP`` and the reindex job's IVF recipe
   (``index.searcher.choose_recipe``) on the same vectors and batches: ms per batch, recall@100
   against the exact fp32 result.

Writes ``benchmarks/results/gpu.md`` and ``.bench/gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

log = logging.getLogger("gpu")
OUT_JSON = REPO / ".bench" / "gpu.json"


DEVICE = "cuda"  # --device cpu: a dry run of every code path on a machine without a GPU (small sizes)


def _sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _time_batches(fn: Any, batches: list[Any], repeats: int) -> float:
    """Median ms per batch over ``repeats`` passes (after one warm-up pass)."""
    import statistics

    for b in batches[:2]:
        fn(b)
    _sync()
    per = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in batches:
            fn(b)
        _sync()
        per.append((time.perf_counter() - t0) * 1000.0 / len(batches))
    return statistics.median(per)


def recall_at(approx: Any, exact: Any, k: int) -> float:
    """Share of the exact top-k ids found in the approximate top-k, averaged over queries."""
    import numpy as np

    a, e = np.asarray(approx)[:, :k], np.asarray(exact)[:, :k]
    return float(np.mean([len(np.intersect1d(x, y)) / k for x, y in zip(a, e, strict=True)]))


# ----------------------------------------------------------------------------------------------


def part_train(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import torch

    from training.synthetic import write_synthetic_parts

    data = workdir / "data"
    t0 = time.perf_counter()
    meta: dict[str, Any] = dict(write_synthetic_parts(data, seed=0, n_users=args.users, n_items=args.items,
                                                      n_clusters=64, interactions_per_user=args.per_user,
                                                      chunk_users=250_000))
    meta["gen_s"] = time.perf_counter() - t0
    runs = {}
    gpus = torch.cuda.device_count() if DEVICE == "cuda" else 1
    for nproc in sorted({1, gpus}) if gpus > 1 else [1]:
        art = workdir / f"art-{nproc}"
        cmd = [sys.executable, "-m", "twotower.cli", "train", "--data", f"csv:{data}", "--artifacts", str(art),
               "--device", DEVICE, "--epochs", "1", "--max-steps", str(args.steps), "--batch-size",
               str(args.batch_size), "--eval-users", "10000", "--quiet", "--threads", str(args.threads)]
        if nproc > 1:
            cmd += ["--nproc", str(nproc)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"training with {nproc} process(es) failed:\n{proc.stderr[-3000:]}")
        version = (art / "models" / "LATEST").read_text().strip()
        m = json.loads((art / "models" / version / "metrics.json").read_text())
        runs[str(nproc)] = {"examples_per_s": m["epochs"][0]["samples_per_s"], "steps": m["steps"],
                            "prepare_s": m["prepare_s"], "wall_s": time.perf_counter() - t0,
                            "cuda_max_memory_mb": m.get("cuda_max_memory_mb"),
                            "peak_rss_mb": m.get("peak_rss_mb"),
                            "test_hr50": (m.get("test") or {}).get("masked", {}).get("HR@50")}
        log.info("train, %d process(es): %s", nproc, runs[str(nproc)])
    return {"data": meta, "runs": runs, "gpus": gpus}


def part_search(args: argparse.Namespace) -> dict[str, Any]:
    """The project's exact search (``index.searcher.ExactSearcher``: torch matmul + top-k) on the GPU,
    numpy queries in and ids out as the service calls it, fp32 and fp16; and the same matmul + topk
    kept on the device (no host copies) to show what the transfers cost."""
    import numpy as np
    import torch

    from index.searcher import ExactSearcher

    rng = np.random.default_rng(0)
    items = rng.standard_normal((args.items, args.dim), dtype=np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    batches = [queries[s:s + args.search_batch] for s in range(0, len(queries), args.search_batch)]
    k = args.k
    out: dict[str, Any] = {"items": args.items, "dim": args.dim, "batch": args.search_batch, "k": k}

    fp32 = ExactSearcher(items, device=DEVICE)
    ms = _time_batches(lambda q: fp32.search(q, k), batches, args.repeats)
    truth = np.concatenate([fp32.search(q, k)[1] for q in batches])
    out["ExactSearcher fp32"] = {"ms_per_batch": ms, "queries_per_s": args.search_batch * 1000.0 / ms}
    fp16 = ExactSearcher(items, device=DEVICE, half=True)
    ms = _time_batches(lambda q: fp16.search(q, k), batches, args.repeats)
    half = np.concatenate([fp16.search(q, k)[1] for q in batches])
    out["ExactSearcher fp16"] = {"ms_per_batch": ms, "queries_per_s": args.search_batch * 1000.0 / ms,
                                 f"recall@{k}": recall_at(half, truth, k)}
    on_dev = torch.from_numpy(items).to(DEVICE)
    dev_batches = [torch.from_numpy(q).to(DEVICE) for q in batches]
    ms = _time_batches(lambda q: torch.topk(q @ on_dev.T, k, dim=1), dev_batches, args.repeats)  # (B, N) -> (B, k)
    out["matmul + topk on the device (no copies)"] = {"ms_per_batch": ms,
                                                      "queries_per_s": args.search_batch * 1000.0 / ms}
    for name, r in out.items():
        if isinstance(r, dict):
            log.info("%s: %.2f ms per batch of %d", name, r["ms_per_batch"], args.search_batch)
    out["_truth"], out["_items"], out["_queries"] = truth, items, queries
    return out


def part_faiss(args: argparse.Namespace, search: dict[str, Any]) -> dict[str, Any]:
    import faiss
    import numpy as np

    from index.searcher import choose_recipe

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        raise RuntimeError("this faiss has no GPU support (install the `gpu` extra: faiss-gpu-cu12)")
    xb, xq, truth, k = search["_items"], search["_queries"], search["_truth"], args.k
    res = faiss.StandardGpuResources()
    batches = [xq[s:s + args.search_batch] for s in range(0, len(xq), args.search_batch)]
    out: dict[str, Any] = {"faiss": getattr(faiss, "__version__", "?")}

    def measure(name: str, index: Any) -> None:
        ms = _time_batches(lambda q: index.search(q, k), batches, args.repeats)
        found = np.concatenate([index.search(q, k)[1] for q in batches])
        out[name] = {"ms_per_batch": ms, "queries_per_s": args.search_batch * 1000.0 / ms,
                     f"recall@{k}": recall_at(found, truth, k)}
        log.info("faiss %s: %.2f ms per batch, recall@%d %.4f", name, ms, k, out[name][f"recall@{k}"])

    flat = faiss.GpuIndexFlatIP(res, xb.shape[1])
    flat.add(xb)
    measure("GpuIndexFlatIP", flat)
    recipe = choose_recipe(len(xb), xb.shape[1])
    cpu_index = faiss.index_factory(xb.shape[1], recipe.factory, faiss.METRIC_INNER_PRODUCT)
    gpu_index = faiss.index_cpu_to_gpu(res, 0, cpu_index)
    t0 = time.perf_counter()
    gpu_index.train(xb)
    gpu_index.add(xb)
    out["ivf_build_s"] = time.perf_counter() - t0
    for nprobe in (16, 64):
        faiss.GpuParameterSpace().set_index_parameter(gpu_index, "nprobe", nprobe)
        measure(f"{recipe.factory} nprobe={nprobe}", gpu_index)
    return out


# ----------------------------------------------------------------------------------------------


def render(res: dict[str, Any]) -> str:
    env = res["env"]
    lines = ["## GPU", "", f"`python benchmarks/gpu.py{env['argv']}` on {env['machine']} ({env['when']}).", ""]
    t = res.get("train")
    if isinstance(t, dict) and "runs" in t:
        d = t["data"]
        lines += ["### Training throughput (`--device cuda`)", "",
                  f"{d['users']:,} users, {d['items']:,} items, {d['interactions']:,} interactions, streamed from "
                  f"Parquet parts; {res['args']['steps']} steps of {res['args']['batch_size']}.", "",
                  "| processes | examples/s | GPU memory MiB (rank 0) | peak RSS MiB | test HR@50 |",
                  "|---|---|---|---|---|"]
        for n, r in t["runs"].items():
            lines.append(f"| {n} | {r['examples_per_s']:,.0f} | {r.get('cuda_max_memory_mb') or '-'} | "
                         f"{r.get('peak_rss_mb') or '-'} | {r.get('test_hr50') or '-'} |")
        lines.append("")
    s = res.get("search")
    if isinstance(s, dict):
        lines += [f"### Exact search, {s['items']:,} items x {s['dim']}, batches of {s['batch']}, top {s['k']}", "",
                  "| method | ms per batch | queries/s | recall@k vs exact fp32 |", "|---|---|---|---|"]
        rows = [(name, r) for name, r in s.items() if isinstance(r, dict)]
        f = res.get("faiss")
        if isinstance(f, dict):
            rows += [(f"faiss {k}", v) for k, v in f.items() if isinstance(v, dict)]
        for name, r in rows:
            rec = next((v for k2, v in r.items() if k2.startswith("recall")), None)
            lines.append(f"| {name} | {r['ms_per_batch']:.2f} | {r['queries_per_s']:,.0f} | "
                         f"{'1 (the reference)' if rec is None else f'{rec:.4f}'} |")
        lines.append("")
    for part in ("train", "search", "faiss"):
        if isinstance(res.get(part), str):
            lines += [f"- {part}: not measured ({res[part].splitlines()[0]})"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--per-user", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=4, help="CPU threads per training process")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=16_384)
    ap.add_argument("--search-batch", type=int, default=1024)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--parts", default="train,search,faiss")
    ap.add_argument("--out", type=Path, default=None,
                    help="markdown report (default benchmarks/results/gpu.md; a CPU dry run: .bench/gpu-dryrun.md)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: a dry run of every part without a GPU (use small --users/--items/--steps)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    global DEVICE, OUT_JSON
    DEVICE = args.device
    if DEVICE == "cpu":  # a dry run never lands in BENCHMARKS.md
        OUT_JSON = REPO / ".bench" / "gpu-dryrun.json"
    if args.out is None:
        args.out = REPO / "benchmarks" / "results" / "gpu.md" if DEVICE == "cuda" else REPO / ".bench" / "gpu-dryrun.md"
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here; run it on a GPU machine (or --device cpu for a dry run)",
              file=sys.stderr)
        return 2
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    res: dict[str, Any] = {
        "env": {"machine": (f"{platform.machine()}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, "
                            f"torch {torch.__version__}, CUDA {torch.version.cuda}") if DEVICE == "cuda"
                else f"{platform.machine()}, CPU dry run (no GPU), torch {torch.__version__}",
                "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "argv": "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    with tempfile.TemporaryDirectory(prefix="gpu-bench-", dir=os.environ.get("TMPDIR")) as tmp:
        for part in parts:
            try:
                if part == "train":
                    res["train"] = part_train(args, Path(tmp))
                elif part == "search":
                    res["search"] = part_search(args)
                elif part == "faiss":
                    if not isinstance(res.get("search"), dict):
                        res["search"] = part_search(args)
                    res["faiss"] = part_faiss(args, res["search"])
            except Exception as exc:  # record and go on: one missing piece must not lose the rest
                log.error("%s failed: %s", part, exc)
                res[part] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    if isinstance(res.get("search"), dict):
        res["search"] = {k: v for k, v in res["search"].items() if not k.startswith("_")}
    OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
    OUT_JSON.write_text(json.dumps(res, indent=2, default=str))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(res))
    print(f"wrote {args.out} and {OUT_JSON}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
