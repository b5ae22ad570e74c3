"""Retrieval quality over HTTP, measured the way a new user measures it (issue #11's protocol).

For each dataset: hold out every user's last interaction; write the rest as a ``csv:DIR`` dataset
(Parquet tables); ``twotower train`` it with the defaults; ``twotower reindex``; start ``twotower
serve`` (a real uvicorn process on a real Redis); send one ``POST /v1/recall`` per user
(``user_id`` only, ``k`` 50, ``exclude_seen``) and score the held-out item. Beside it, in the same
run: EASE (lambda 500) fitted on the same rows, and the offline evaluator (``training/evaluate.py``)
scoring the same model on the same held-out items. The HTTP and offline figures should agree up to
ties and the index's approximation; a gap is a bug in what the service serves.

    python benchmarks/http_quality.py                           # the four quality datasets
    python benchmarks/http_quality.py --datasets synthetic-longtail

Writes benchmarks/results/http_quality.md (and .json beside it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import datasets as bench_data  # noqa: E402
from serve import free_port, start_service, stop  # noqa: E402

from training.baselines import DEFAULT_EASE_LAMBDA, ease_dtype, ease_scorer, fit_ease  # noqa: E402
from training.data import Split, load_data  # noqa: E402
from training.evaluate import build_eval_set, evaluate_model, evaluate_scores  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
K = 50
log = logging.getLogger("http_quality")


def hold_out_last(inter: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(kept, held): each user's last interaction (by time, ties: the later row) held out."""
    s = inter.sort_values(["user_id", "timestamp"], kind="stable")
    last = s.groupby("user_id").cumcount(ascending=False) == 0
    return s[~last], s[last]


def write_dataset(data: Any, kept: pd.DataFrame, dest: Path) -> str:
    """The kept rows with the catalogue and user table as a csv:DIR dataset (Parquet files; a
    multi-valued feature as a list column, as the training job's own data snapshot writes it)."""
    from training.train import write_data_snapshot

    write_data_snapshot(replace(data, interactions=kept.reset_index(drop=True)), dest)
    return f"csv:{dest}"


def recall_over_http(port: int, users: list[str], k: int) -> dict[str, list[Any]]:
    """One recall per user on one keep-alive connection: user id -> item ids."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    out: dict[str, list[Any]] = {}
    try:
        for u in users:
            conn.request("POST", "/v1/recall", body=json.dumps({"user_id": u, "k": k, "exclude_seen": True}),
                         headers={"content-type": "application/json"})
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"recall for user {u!r}: HTTP {resp.status} {body[:200]!r}")
            out[u] = [it["item_id"] for it in json.loads(body)["items"]]
    finally:
        conn.close()
    return out


def run_dataset(name: str, workdir: Path, redis_url: str) -> dict[str, Any]:
    from index.reindex import ReindexConfig
    from index.reindex import run as reindex
    from towers.checkpoint import load_checkpoint
    from training.train import TrainConfig
    from training.train import run as train

    data = load_data(bench_data.ensure(name))
    kept, held = hold_out_last(data.interactions)
    spec = write_dataset(data, kept, workdir / "data")
    mine = load_data(spec)  # the data as the trainer reads it
    split = Split(train=mine.interactions, valid=mine.interactions.iloc[:0],
                  test=held.assign(user_id=held["user_id"].astype(str)))
    ev = build_eval_set(mine, split, "test")

    t0 = time.perf_counter()
    res = train(TrainConfig(data=spec, artifacts=str(workdir / "artifacts"), quiet=True, seed=0))
    train_s = time.perf_counter() - t0
    manifest = reindex(ReindexConfig(artifacts=workdir / "artifacts"))
    offline = evaluate_model(load_checkpoint(res.model_path), mine, split, which="test", ks=(K,), mask_seen="masked",
                             ev=ev)["masked"][f"HR@{K}"]

    port = free_port()
    proc = start_service(workdir / "artifacts", port, redis_url, f"httpq-{uuid.uuid4().hex[:8]}", microbatch=False,
                         log=workdir / "serve.log")
    try:
        t1 = time.perf_counter()
        answers = recall_over_http(port, ev.user_ids.tolist(), K)
        http_s = time.perf_counter() - t1
    finally:
        stop(proc)
    target = dict(zip(held["user_id"].astype(str), held["item_id"].tolist(), strict=True))
    hits = [target[u] in answers[u] for u in ev.user_ids]
    http_hr = float(np.mean(hits))

    B = fit_ease(mine.interactions, ev.item_ids, lam=DEFAULT_EASE_LAMBDA, dtype=ease_dtype(ev.n_items))
    ease = evaluate_scores(ease_scorer(B, ev), ev, ks=(K,), mask_seen="masked")["masked"][f"HR@{K}"]
    del B
    row = {"dataset": name, "users": ev.n_users, "items": ev.n_items, "http_hr": http_hr, "offline_hr": float(offline),
           "ease_hr": float(ease), "ratio": http_hr / ease if ease else None, "train_s": train_s,
           "http_s": http_s, "neighbour_weight": manifest.neighbour_weight,
           "neighbours": res.metrics.get("neighbours", {}).get("why"), "recipe": manifest.recipe.get("factory"),
           "index_recall": manifest.recall}
    log.info("%s: HTTP HR@%d %.4f, offline %.4f, EASE %.4f (%.2fx), neighbour weight %g", name, K, http_hr, offline,
             ease, row["ratio"] or float("nan"), manifest.neighbour_weight)
    return row


def render(rows: list[dict[str, Any]], argv: str) -> str:
    lines = ["# Retrieval quality over HTTP (train, reindex, serve, one recall per user)", "",
             "Each user's last interaction held out; the rest trained with the defaults (`twotower train`), "
             "published (`twotower reindex`) and served (`twotower serve`, uvicorn, Redis). One `POST /v1/recall` "
             f"per user with its id only, k {K}, `exclude_seen`; HR@{K} = share of users whose held-out item is in "
             "the answer. EASE (lambda 500) and the offline evaluator score the same users on the same rows.", "",
             f"| dataset | users | items | HR@{K} over HTTP | offline evaluator | EASE | HTTP / EASE | neighbour weight "
             "| index | train s | recalls s |", "|---" * 11 + "|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['users']:,} | {r['items']:,} | **{r['http_hr']:.4f}** | {r['offline_hr']:.4f} "
                     f"| {r['ease_hr']:.4f} | {r['ratio']:.2f} | {r['neighbour_weight']:g} | {r['recipe']} "
                     f"(recall {r['index_recall']:.3f}) | {r['train_s']:.1f} | {r['http_s']:.1f} |")
    worst = min(rows, key=lambda r: r["ratio"] or 0.0)
    lines += ["", f"Worst HTTP / EASE: **{worst['ratio']:.2f}** ({worst['dataset']}).", "",
              "Neighbour weight: what training chose on its validation split for blending the last item's "
              "neighbours into recall (0: the towers alone); why, per dataset:", ""]
    lines += [f"- {r['dataset']}: {r['neighbours']}" for r in rows]
    lines += ["", f"Run {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC with `python benchmarks/http_quality.py{argv}`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default=",".join(bench_data.DATASETS))
    ap.add_argument("--redis-url", default=os.environ.get("TT_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--out", type=Path, default=RESULTS / "http_quality.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rows = []
    for name in [d for d in args.datasets.split(",") if d]:
        with tempfile.TemporaryDirectory(prefix=f"httpq-{name}-") as tmp:
            rows.append(run_dataset(name, Path(tmp), args.redis_url))
    argv_text = "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    args.out.write_text(render(rows, argv_text))
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2, default=str))
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
