"""Training at the size users have: throughput, memory and quality from 100k to 5M users.

    python benchmarks/scale.py [--parts quality,sizes,procs,rechub,reindex,ids] [--quality-models M,..] [--quality-samplers S,..]
        [--sizes 100000,1000000,5000000] [--items 1000000] [--per-user 5] [--steps 1500] [--batch-size 1024]

Parts (each can be run alone; results are merged into ``benchmarks/results/scale.json`` and rendered to
``benchmarks/results/scale.md``):

- ``quality``: the id tables' optimisers side by side on MovieLens-100k and ml-latest-small (our
  default YoutubeDNN and DSSM, every negative sampler): test HR@50 with the new default (row-wise
  Adagrad), SparseAdam, and dense AdamW on every row (the job before this change).
- ``sizes``: synthetic data written as Parquet parts chunk by chunk (``write_synthetic_parts``) at each
  size, then ``twotower train`` streaming it in its own process, one thread, a fixed budget of
  ``--steps`` optimiser steps, with a user-id table (``--user-id on``): examples/s, seconds per epoch
  (examples of an epoch / examples/s),
  peak RSS of the whole process (``/usr/bin/time``; the generator's too), test HR@50 on the
  10,000-user sample. Beside it, the dense-AdamW reference where it fits in the budget.
- ``procs``: the same job with 1 process and with 2 (``--nproc 2``), one thread each, same budget
  and global batch, at each of ``--procs-batches``: examples/s of both. Each rank trains half the
  batch but embeds and scores the whole global candidate list, and a step costs a few collectives
  of fixed latency, so the split pays more as the batch grows.
- ``rechub``: torch-rechub 0.9.0's YoutubeDNN and DSSM (``benchmarks/rechub_runner.py``, their example
  recipes, one epoch, one thread, no DataLoader workers) on the smallest size's train rows:
  positives per second beside ours, trained on the same data in the same run: our defaults, and
  their model (the mean of the history, one vector per user: ``--history-encoder mean --interests 1``).
- ``reindex``: ``twotower reindex`` of the 1M-user model: embeds its 1M-item catalogue, builds and
  gates the index; wall time and peak RSS.
- ``ids``: the A/B of the one hand-written structure the sizes need, ``towers/idindex.py`` against a
  ``dict`` (+ the list back) over the largest size's user ids: memory held, build and lookup time.

Run it on otherwise idle cores: every figure is a rate or a ratio of rates.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

log = logging.getLogger("scale")

BENCH = REPO / ".bench" / "scale"
OUT_JSON = REPO / "benchmarks" / "results" / "scale.json"  # committed: a later run of one part keeps the others
OUT_MD = REPO / "benchmarks" / "results" / "scale.md"
ML100K = f"movielens:{REPO.parent / 'shared' / 'data' / 'ml-100k'}"
MLSMALL = f"movielens:{REPO.parent / 'shared' / 'data' / 'ml-latest-small'}"
SAMPLERS = ("mixed", "inbatch", "uniform", "popularity", "hard")
TIME = "/usr/bin/time"


def _py() -> str:
    return sys.executable


def timed_run(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` under GNU time: wall seconds, peak RSS (MiB) of the process, exit status."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    rss_file = log_path.with_suffix(".rss")
    t0 = time.perf_counter()
    with open(log_path, "w") as out:
        rc = subprocess.run([TIME, "-f", "%M", "-o", str(rss_file), *cmd], stdout=out, stderr=subprocess.STDOUT,
                            cwd=REPO, env={**os.environ, **(env or {})}).returncode
    wall = time.perf_counter() - t0
    try:
        rss_mb = int(rss_file.read_text().strip().splitlines()[-1]) / 1024.0
    except (OSError, ValueError, IndexError):
        rss_mb = float("nan")
    if rc != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed with status {rc}:\n{tail}")
    return {"wall_s": wall, "peak_rss_mb": rss_mb}


# ----------------------------------------------------------------------------------------------
# quality: the optimisers side by side


def part_quality(args: argparse.Namespace) -> dict[str, Any]:
    from training.config import TrainConfig
    from training.train import run

    rows = []
    for data in (ML100K, MLSMALL):
        for model in args.quality_models:
            for negatives in args.quality_samplers:
                kinds = ("rowwise_adagrad", "adamw") + (("sparse_adam",) if negatives == "mixed" else ())
                for kind in kinds:
                    with tempfile.TemporaryDirectory(prefix="scale-q-") as tmp:
                        t0 = time.perf_counter()
                        settings: dict[str, Any] = {"data": data, "artifacts": tmp, "model": model,
                                                    "negatives": negatives, "embedding_optimizer": kind,
                                                    "quiet": True, "num_threads": 1, "seed": 0}
                        res = run(TrainConfig(**settings))
                        m = res.metrics
                        rows.append({"data": data.rsplit("/", 1)[-1], "model": model, "negatives": negatives,
                                     "optimizer": kind, "test_hr50": m["test"]["masked"]["HR@50"],
                                     "valid_hr50": m["best_valid_hr@50"], "best_epoch": m["best_epoch"],
                                     "samples_per_s": max(e["samples_per_s"] for e in m["epochs"]),
                                     "wall_s": time.perf_counter() - t0})
                        log.info("quality %s", rows[-1])
    return {"rows": rows}


# ----------------------------------------------------------------------------------------------
# data at each size


def data_dir(n_users: int, args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """The synthetic parts for ``n_users`` (generated once, in its own process, under GNU time)."""
    d = BENCH / f"data-{n_users}u-{args.items}i-{args.per_user}pu"
    meta_path = d / "meta.json"
    if meta_path.is_file():
        return d, json.loads(meta_path.read_text())
    if d.exists():
        shutil.rmtree(d)
    code = ("import json, sys, logging; logging.basicConfig(level=logging.INFO); "
            "from training.synthetic import write_synthetic_parts; "
            f"print(json.dumps(write_synthetic_parts({str(d)!r}, seed=0, n_users={n_users}, n_items={args.items}, "
            f"n_clusters={args.clusters}, interactions_per_user={args.per_user}, chunk_users=250_000)))")
    t = timed_run([_py(), "-c", code], BENCH / "logs" / f"gen-{n_users}.log")
    out = json.loads((BENCH / "logs" / f"gen-{n_users}.log").read_text().strip().splitlines()[-1])
    meta = {**out, "gen_wall_s": t["wall_s"], "gen_peak_rss_mb": t["peak_rss_mb"]}
    meta_path.write_text(json.dumps(meta))
    return d, meta


def train_cmd(data: Path, art: Path, args: argparse.Namespace, *extra: str, steps: int | None = None) -> list[str]:
    return [_py(), "-m", "twotower.cli", "--log-level", "INFO", "train", "--data", f"csv:{data}",
            "--artifacts", str(art), "--threads", "1", "--epochs", "1", "--max-steps", str(steps or args.steps),
            "--batch-size", str(args.batch_size), "--eval-users", str(args.eval_users), "--quiet",
            # a user-id table in every run (synthetic users have ~5 rows, for which the data-derived default
            # turns it off): the table that grows with the number of users is what this measures
            "--user-id", "on", *extra]


def train_once(name: str, data: Path, args: argparse.Namespace, *extra: str, steps: int | None = None,
               keep: bool = False) -> dict[str, Any]:
    art = BENCH / "runs" / name
    if art.exists():
        shutil.rmtree(art)
    t = timed_run(train_cmd(data, art, args, *extra, steps=steps), BENCH / "logs" / f"{name}.log")
    version = (art / "models" / "LATEST").read_text().strip()
    mdir = art / "models" / version
    m = json.loads((mdir / "metrics.json").read_text())
    c = json.loads((mdir / "config.json").read_text())
    e = m["epochs"][0]
    out = {"name": name, "examples_per_s": e["samples_per_s"], "steps": m["steps"], "train_s": e["train_s"],
           "prepare_s": m["prepare_s"], "wall_s": t["wall_s"], "peak_rss_mb": t["peak_rss_mb"],
           "peak_rss_mb_per_rank": m.get("peak_rss_mb_per_rank"), "ranks": m.get("ranks", 1),
           "test_hr50": (m.get("test") or {}).get("masked", {}).get("HR@50"),
           "eval_users": c["dataset"].get("eval_users"), "examples_per_epoch": c["dataset"]["examples"],
           "history_encoder": c["train"]["history_encoder"], "interests": c["train"]["interests"],
           "version": version, "artifacts": str(art)}
    out["s_per_epoch"] = out["examples_per_epoch"] / max(out["examples_per_s"], 1e-9)
    if not keep:
        for sub in mdir.iterdir():  # keep metrics/config for the record; drop the big files
            if sub.suffix == ".pt" or sub.name == "data":
                shutil.rmtree(sub) if sub.is_dir() else sub.unlink()
    log.info("%s: %.0f examples/s, peak RSS %.0f MiB, test HR@50 %s", name, out["examples_per_s"],
             out["peak_rss_mb"], out["test_hr50"])
    return out


def part_sizes(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for n in args.sizes:
        d, meta = data_dir(n, args)
        row = {"users": n, **meta, "sparse": train_once(f"sparse-{n}", d, args, keep=(n == args.reindex_size))}
        if n <= args.dense_max_users:
            row["dense"] = train_once(f"dense-{n}", d, args, "--embedding-optimizer", "adamw", steps=args.dense_steps)
        rows.append(row)
    return {"rows": rows}


def part_procs(args: argparse.Namespace) -> dict[str, Any]:
    d, meta = data_dir(args.procs_size, args)
    rows = []
    for batch in args.procs_batches:
        opts = argparse.Namespace(**{**vars(args), "batch_size": batch})
        one = train_once(f"procs1-{args.procs_size}-b{batch}", d, opts)
        two = train_once(f"procs2-{args.procs_size}-b{batch}", d, opts, "--nproc", "2")
        rows.append({"batch": batch, "one": one, "two": two, "ratio": two["examples_per_s"] / one["examples_per_s"]})
    return {"users": args.procs_size, "rows": rows}


# ----------------------------------------------------------------------------------------------
# ids: towers/idindex.py against a dict, the hand-written part's A/B

_IDS_PROBE = r"""
import gc, json, random, sys, time, tracemalloc
import numpy as np
from towers.idindex import IdIndex

n, kind, n_queries = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])


def make_ids():
    return [str(u) for u in range(1, n + 1)]  # the synthetic generator's user ids


def build(ids):
    if kind == "dict":  # both directions, as the encoder needs them: id -> row and row -> id
        return {s: i + 1 for i, s in enumerate(ids)}, list(ids)
    return IdIndex.of(ids)


ids = make_ids()
t0 = time.perf_counter()
held = build(ids)
build_s = time.perf_counter() - t0
del held, ids
gc.collect()
# again under tracing (which slows allocation, so not timed), the ids' strings included: the dict
# keeps them alive, the IdIndex copies them into one string and lets them go
tracemalloc.start()
ids = make_ids()
held = build(ids)
del ids
gc.collect()
mib = tracemalloc.get_traced_memory()[0] / 2**20  # what the structure holds once its input is gone
tracemalloc.stop()
if kind == "dict":
    lookup = lambda keys: np.fromiter((held[0].get(k, 0) for k in keys), dtype=np.int64, count=len(keys))
else:
    lookup = held.rows
rng = random.Random(0)
# fresh str objects, as ids arrive in requests and data (a str caches its hash once computed)
keys = ["%d" % rng.randint(1, n) for _ in range(n_queries)]
t0 = time.perf_counter()
rows = lookup(keys)
lookup_s = time.perf_counter() - t0
assert all(int(k) == r for k, r in zip(keys[:1000], rows[:1000].tolist())), "wrong rows"
print(json.dumps({"kind": kind, "ids": n, "held_mib": mib, "build_s": build_s,
                  "lookup_us": lookup_s / n_queries * 1e6}))
"""


def part_ids(args: argparse.Namespace) -> dict[str, Any]:
    """Memory held, build time and lookup time of the user ids' row index at the largest size, each
    structure in a fresh process (tracemalloc sees Python objects and numpy buffers alike)."""
    n = max(args.sizes)
    out = {}
    for kind in ("dict", "idindex"):
        proc = subprocess.run([_py(), "-c", _IDS_PROBE, str(n), kind, "1000000"], capture_output=True, text=True,
                              cwd=REPO, check=True)
        out[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"ids": n, **out}


# ----------------------------------------------------------------------------------------------
# torch-rechub on the same data


def part_rechub(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import pandas as pd

    from benchmarks.quality import ensure_rechub_venv, export_for_rechub
    from training.data import RecData, split_leave_last_out
    from training.evaluate import build_eval_set

    n = args.rechub_size
    d, meta = data_dir(n, args)
    inter = pd.concat([pd.read_parquet(p) for p in sorted((d / "interactions").iterdir())], ignore_index=True)
    users = pd.read_parquet(d / "users.parquet").set_index("user_id")
    items = pd.read_parquet(d / "items.parquet")
    items["genres"] = items["category"].map(lambda c: (c,))  # their item feature: one category
    data = RecData(name="synthetic", interactions=inter, users=users.rename(columns={"segment": "occupation"}),
                   items=items, user_features=[], item_features=[])
    split = split_leave_last_out(data)
    ev = build_eval_set(data, split, "test")
    inp = BENCH / f"rechub-input-{n}"
    if inp.exists():
        shutil.rmtree(inp)
    export_for_rechub(data, split, ev, inp)
    py = ensure_rechub_venv(REPO / ".bench" / "rechub-venv")
    out = BENCH / f"rechub-output-{n}"
    res: dict[str, Any] = {"users": n, "train_rows": len(split.train), "models": {}}
    for model in ("youtubednn", "dssm"):
        t = timed_run([str(py), str(REPO / "benchmarks" / "rechub_runner.py"), "--input", str(inp), "--output",
                       str(out), "--models", model, "--epochs", "1", "--threads", "1", "--num-workers", "0"],
                      BENCH / "logs" / f"rechub-{model}-{n}.log")
        m = json.loads((out / f"{model}.json").read_text())
        # one positive per training row of ours; their generator makes 1 + 3 negatives rows (DSSM,
        # point-wise) or one row per positive with its 3 negatives inside (YoutubeDNN, list-wise)
        res["models"][model] = {"fit_s": m["fit_s"], "prep_s": m["prep_s"], "samples": m["n_train_samples"],
                                "positives_per_s": len(split.train) / m["fit_s"],
                                "samples_per_s": m["n_train_samples"] / m["fit_s"], "peak_rss_mb": t["peak_rss_mb"]}
        log.info("rechub %s: %s", model, res["models"][model])
    # ours on the same data in the same run (the sizes part's row may come from another day): the
    # defaults, and the model their YoutubeDNN is (one vector per user, the mean of the history)
    res["ours"] = train_once(f"rechub-ours-{n}", d, args)
    res["ours_mean"] = train_once(f"rechub-ours-mean-{n}", d, args, "--history-encoder", "mean", "--interests", "1")
    del np
    return res


# ----------------------------------------------------------------------------------------------
# reindex of the big catalogue


def part_reindex(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    row = next((r for r in results.get("sizes", {}).get("rows", []) if r["users"] == args.reindex_size), None)
    if row is None or not (Path(row["sparse"]["artifacts"]) / "models").is_dir():
        raise RuntimeError(f"no kept model at {args.reindex_size} users: run --parts sizes first")
    art = Path(row["sparse"]["artifacts"])
    t = timed_run([_py(), "-m", "twotower.cli", "--log-level", "INFO", "reindex", "--artifacts", str(art),
                   "--model-version", row["sparse"]["version"], "--threads", "1", "--json"],
                  BENCH / "logs" / f"reindex-{args.reindex_size}.log")
    text = (BENCH / "logs" / f"reindex-{args.reindex_size}.log").read_text()
    start = text.find("{")
    manifest = json.loads(text[start:text.rfind("}") + 1]) if start >= 0 else {}
    return {"users": args.reindex_size, "items": args.items, **t,
            "recipe": manifest.get("recipe"), "recall": manifest.get("recall"),
            "n_items": manifest.get("n_items")}


# ----------------------------------------------------------------------------------------------
# report


def _f(x: Any, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    return f"{x:,.{digits}f}"


def run_of(res: dict[str, Any], part: str) -> dict[str, Any]:
    """The run that measured ``part`` (results from before runs were kept per part: the one run)."""
    return res.get(part, {}).get("run") or {**res.get("env", {}), "args": res.get("args", {})}


def render(res: dict[str, Any]) -> str:
    lines = ["## Training at scale: sparse id tables, streamed data, several processes", "",
             "`benchmarks/scale.py` (its docstring says how each part is measured). Every training run is "
             "`twotower train` in its own process, one torch thread, on otherwise idle cores; peak RSS "
             "is GNU time's maximum resident set of the whole process.", ""]
    q = res.get("quality")
    if q:
        lines += ["### Quality: the id tables' optimisers side by side", "",
                  "Test HR@50 (seen items masked), same seeds and settings, only `--embedding-optimizer` differs. "
                  "`adamw` is the job before this change (dense AdamW on every row, every step).", "",
                  "| data | model | negatives | rowwise_adagrad (default) | adamw (before) | difference | sparse_adam |",
                  "|---|---|---|---|---|---|---|"]
        by = {(r["data"], r["model"], r["negatives"], r["optimizer"]): r for r in q["rows"]}
        worst: dict[str, float] = {}
        for (data, model, neg, opt), r in by.items():
            if opt != "rowwise_adagrad":
                continue
            ref = by.get((data, model, neg, "adamw"))
            sa = by.get((data, model, neg, "sparse_adam"))
            diff = r["test_hr50"] - ref["test_hr50"] if ref else None
            if diff is not None:
                worst[data] = min(worst.get(data, 1.0), diff)
            lines.append(f"| {data} | {model} | {neg} | {r['test_hr50']:.3f} | {_f(ref and ref['test_hr50'], 3)} | "
                         f"{'-' if diff is None else f'{diff:+.3f}'} | {_f(sa and sa['test_hr50'], 3)} |")
        lines.append("")
        for data, w in worst.items():
            lines.append(f"- {data}: largest drop {w:+.3f} (target: no drop beyond -0.010: "
                         f"{'met' if w >= -0.010 else 'NOT met'})")
        lines.append("")
    s = res.get("sizes")
    if s:
        a = run_of(res, "sizes")["args"]
        lines += ["### Sizes: 1 process, 1 thread, streamed from Parquet parts", "",
                  f"Budget: {a['steps']} optimiser steps of {a['batch_size']} examples "
                  f"(`--max-steps`; a smaller data set's one epoch if shorter), then validation and test on a "
                  f"{a['eval_users']:,}-user sample "
                  "against the whole catalogue.", "",
                  "| users | items | interactions | generate s (peak RSS MiB) | prepare s | examples/s | s/epoch "
                  "| peak RSS MiB | test HR@50 | dense adamw examples/s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in s["rows"]:
            sp = r["sparse"]
            dense = r.get("dense")
            lines.append(f"| {r['users']:,} | {r['items']:,} | {r['interactions']:,} | {_f(r['gen_wall_s'])} "
                         f"({_f(r['gen_peak_rss_mb'])}) | {_f(sp['prepare_s'])} | {_f(sp['examples_per_s'])} | "
                         f"{_f(sp['s_per_epoch'])} | {_f(sp['peak_rss_mb'])} | {_f(sp['test_hr50'], 3)} | "
                         f"{_f(dense and dense['examples_per_s'])} |")
        lo, hi = s["rows"][0]["sparse"], s["rows"][-1]["sparse"]
        ratio = lo["examples_per_s"] / hi["examples_per_s"]
        top = s["rows"][-1]
        lines += ["", f"- examples/s at {s['rows'][0]['users']:,} users / at {top['users']:,}: {ratio:.2f}x "
                  f"(target <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'})",
                  f"- peak RSS at {top['interactions']:,} interactions: {hi['peak_rss_mb']:,.0f} MiB "
                  f"(target <= 4 GB = 3,815 MiB: {'met' if hi['peak_rss_mb'] <= 4e9 / 2**20 else 'NOT met'}); "
                  f"the generator that wrote them: {top['gen_peak_rss_mb']:,.0f} MiB", ""]
    p = res.get("procs")
    if p:
        prow = p["rows"]
        lines += ["### 1 vs 2 processes (one thread each, the 2 cores)", "",
                  f"{p['users']:,} users, same budget and global batch (each rank trains half of it against the "
                  "whole global candidate list); `twotower train --nproc 2` (torchrun, gloo).", "",
                  "| global batch | processes | examples/s | peak RSS MiB per process | test HR@50 |",
                  "|---|---|---|---|---|"]
        for r in prow:
            lines += [f"| {_f(r['batch'])} | 1 | {_f(r['one']['examples_per_s'])} | {_f(r['one']['peak_rss_mb'])} | "
                      f"{_f(r['one']['test_hr50'], 3)} |",
                      f"| {_f(r['batch'])} | 2 | {_f(r['two']['examples_per_s'])} | "
                      f"{', '.join(_f(x) for x in r['two'].get('peak_rss_mb_per_rank') or [])} | "
                      f"{_f(r['two']['test_hr50'], 3)} |"]
        lines.append("")
        for r in prow:
            lines.append(f"- batch {_f(r['batch'])}: 2 processes / 1: {r['ratio']:.2f}x (target >= 1.7x: "
                         f"{'met' if r['ratio'] >= 1.7 else 'NOT met'})")
        lines.append("")
    rh = res.get("rechub")
    if rh:
        ours = rh.get("ours") or next((r["sparse"] for r in (s or {}).get("rows", []) if r["users"] == rh["users"]),
                                      None)
        lines += ["### torch-rechub on the same data", "",
                  f"{rh['users']:,} users, {rh['train_rows']:,} training rows (our split; theirs holds out the same "
                  "rows). torch-rechub 0.9.0's example recipes, 1 epoch, 1 thread, no DataLoader workers. "
                  "Positives/s = our training rows / their fit time (their rows carry 3 sampled negatives each; "
                  "ours score every example against the whole global batch plus 256 shared negatives).", "",
                  "| trainer | positives/s | their samples/s | peak RSS MiB |", "|---|---|---|---|"]
        for model, m in rh["models"].items():
            lines.append(f"| torch-rechub {model} | {_f(m['positives_per_s'])} | {_f(m['samples_per_s'])} | "
                         f"{_f(m['peak_rss_mb'])} |")
        fastest = max(m["positives_per_s"] for m in rh["models"].values())
        mean = rh.get("ours_mean")
        if ours:
            lines.append(f"| ours, defaults (youtubednn, {ours.get('history_encoder', '?')} over the history, "
                         f"{ours.get('interests', '?')} interests) | {_f(ours['examples_per_s'])} | - | "
                         f"{_f(ours['peak_rss_mb'])} |")
        if mean:
            lines.append(f"| ours, their model (mean of the history, one vector per user) | "
                         f"{_f(mean['examples_per_s'])} | - | {_f(mean['peak_rss_mb'])} |")
        if ours or mean:
            lines.append("")
        for label, row in (("defaults", ours), ("their model", mean)):
            if row:
                r = row["examples_per_s"] / fastest
                lines.append(f"- ours ({label}) / the faster torch-rechub model: {r:.1f}x (target >= 5x: "
                             f"{'met' if r >= 5 else 'NOT met'})")
        lines.append("")
    ri = res.get("reindex")
    if ri:
        lines += ["### Reindex of the resulting catalogue", "",
                  f"`twotower reindex` of the {ri['users']:,}-user model: {_f(ri.get('n_items') or ri['items'])} items "
                  f"embedded, index `{(ri.get('recipe') or {}).get('factory', '?')}` built and gated (recall "
                  f"{_f(ri.get('recall'), 3)}): {_f(ri['wall_s'])} s wall, peak RSS {_f(ri['peak_rss_mb'])} MiB.", ""]
    ids = res.get("ids")
    if ids:
        d, x = ids["dict"], ids["idindex"]
        lines += ["### The user ids' row index: `towers/idindex.py` against a dict", "",
                  f"{ids['ids']:,} user ids (the largest size's), each structure built in a fresh process from a "
                  "list of the ids; memory held once that list is gone (tracemalloc: Python objects and numpy "
                  "buffers), both directions (id -> row, row -> id); lookups of 1,000,000 random known ids as "
                  "new strings, in one batch.", "",
                  "| structure | memory held MiB | build s | lookup us per id |", "|---|---|---|---|",
                  f"| dict + list (before) | {_f(d['held_mib'])} | {_f(d['build_s'], 2)} | {_f(d['lookup_us'], 2)} |",
                  f"| IdIndex | {_f(x['held_mib'])} | {_f(x['build_s'], 2)} | {_f(x['lookup_us'], 2)} |", "",
                  f"- memory: {x['held_mib'] / d['held_mib']:.2f}x the dict's; lookups {x['lookup_us'] / d['lookup_us']:.1f}x "
                  "as slow (a batch of 1024 ids: a fraction of a millisecond, beside a training step's tens)", ""]
    runs: dict[str, list[str]] = {}
    for part in ("quality", "sizes", "procs", "rechub", "reindex", "ids"):
        if part in res:
            r = run_of(res, part)
            key = (f"{r.get('machine', '?')}; torch {r.get('torch', '?')}; run at {r.get('when', '?')} with "
                   f"`python benchmarks/scale.py{r.get('argv', '')}`; 1-min load average {r.get('load_start', '?')} "
                   f"at the start, {r.get('load_end', '?')} at the end")
            runs.setdefault(key, []).append(part)
    lines += ["Runs (each part keeps the run that measured it):", ""]
    lines += [f"- {', '.join(parts)}: {key}." for key, parts in runs.items()] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="quality,sizes,procs,rechub,reindex,ids")
    ap.add_argument("--quality-models", default="youtubednn,dssm", type=lambda t: [x for x in t.split(",") if x])
    ap.add_argument("--quality-samplers", default=",".join(SAMPLERS), type=lambda t: [x for x in t.split(",") if x],
                    help="negative samplers of the quality part (each a full training run per optimiser)")
    ap.add_argument("--sizes", default="100000,1000000,5000000",
                    type=lambda t: [int(x) for x in t.split(",") if x.strip()])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--clusters", type=int, default=64)
    ap.add_argument("--per-user", type=int, default=5, help="mean interactions per user")
    ap.add_argument("--steps", type=int, default=1500, help="optimiser steps per training run (the budget)")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--eval-users", type=int, default=10_000)
    ap.add_argument("--dense-max-users", type=int, default=1_000_000, help="dense-AdamW reference up to this size")
    ap.add_argument("--dense-steps", type=int, default=100)
    ap.add_argument("--procs-size", type=int, default=1_000_000)
    ap.add_argument("--procs-batches", default="1024,4096", type=lambda t: [int(x) for x in t.split(",") if x.strip()],
                    help="global batch sizes of the 1-vs-2-process comparison")
    ap.add_argument("--rechub-size", type=int, default=100_000)
    ap.add_argument("--reindex-size", type=int, default=1_000_000)
    ap.add_argument("--rerender", action="store_true", help="only rewrite the markdown from benchmarks/results/scale.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results: dict[str, Any] = json.loads(OUT_JSON.read_text()) if OUT_JSON.is_file() else {}
    if not args.rerender:
        import torch

        parts = [p.strip() for p in args.parts.split(",") if p.strip()]
        # each part keeps the run that measured it (a later run of other parts leaves it as it was)
        run_info = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                               f"{'CUDA' if torch.cuda.is_available() else 'no GPU'}",
                    "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "argv": "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
                    "load_start": round(os.getloadavg()[0], 1),
                    "args": {k: v for k, v in vars(args).items() if k != "rerender"}}
        for part in parts:
            log.info("== %s", part)
            if part == "quality":
                results["quality"] = part_quality(args)
            elif part == "sizes":
                results["sizes"] = part_sizes(args)
            elif part == "procs":
                results["procs"] = part_procs(args)
            elif part == "rechub":
                results["rechub"] = part_rechub(args)
            elif part == "reindex":
                results["reindex"] = part_reindex(args, results)
            elif part == "ids":
                results["ids"] = part_ids(args)
            else:
                raise SystemExit(f"unknown part {part!r}")
            results[part]["run"] = {**run_info, "load_end": round(os.getloadavg()[0], 1)}
            OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
            OUT_JSON.write_text(json.dumps(results, indent=2, default=str))
    OUT_MD.parent.mkdir(parents=True, exist_ok=True)
    OUT_MD.write_text(render(results))
    log.info("wrote %s", OUT_MD)
    return 0


if __name__ == "__main__":
    sys.exit(main())
