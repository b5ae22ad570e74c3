"""Retrieval quality over several datasets, every model scored by ONE exact evaluator.

    python benchmarks/quality.py                         # every dataset, every row
    python benchmarks/quality.py --datasets ml-100k --only ease,ours
    python benchmarks/quality.py --only tuned            # `twotower tune --budget 10m`, then train the winner
    python benchmarks/quality.py --render                # rewrite the report from benchmarks/results/quality.json

Datasets (``benchmarks/datasets.py``): MovieLens-100k and ml-latest-small from ``../shared/data``, and
two synthetic shapes unlike them (a 20k-item long-tail catalogue; short session-like histories).
Rows per dataset: popularity and EASE (lambda 500) as references; torch-rechub 0.9.0's DSSM and
YoutubeDNN trained the way its own MovieLens examples train them (``rechub_runner.py``, in a
separate virtualenv); ours with the shipped defaults (data-derived values included); the
mean-pooled YoutubeDNN baseline and one row per option on top of it; and the winner of a
10-minute ``twotower tune`` (searched on validation rows only) trained with ``--config best.json``.

Every model is scored by ``training.evaluate.evaluate_scores`` on the per-user leave-last-out TEST
rows (history = train + valid rows; "masked" = every item seen before the target removed). The
headline is the WORST ratio to EASE over the datasets. Results accumulate in ``benchmarks/results/quality.json``
(a run replaces the rows it ran), and ``benchmarks/results/quality.md`` is rendered from all of them.

The torch-rechub virtualenv lives in ``.bench/rechub-venv`` (gitignored): created with this
interpreter, then ``pip install torch==2.13.0`` FIRST (so pip never pulls another torch build),
then ``pip install torch-rechub==0.9.0`` from PyPI. Run it on otherwise idle cores: training times
mean nothing when something else competes for them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
for p in (str(REPO), str(REPO / "benchmarks")):
    if p not in sys.path:  # runnable as a plain script from a checkout
        sys.path.insert(0, p)

import datasets as bench_data  # noqa: E402

from training.baselines import DEFAULT_EASE_LAMBDA, ease_dtype, ease_scorer, fit_ease, popularity_scorer  # noqa: E402
from training.data import load_data, split_leave_last_out  # noqa: E402
from training.evaluate import EvalSet, build_eval_set, evaluate_model, evaluate_scores  # noqa: E402

log = logging.getLogger("quality")

RECHUB_VERSION = "0.9.0"
TORCH_VERSION = "2.13.0"
KS = (10, 50, 100)
RECHUB_EXAMPLES = "https://github.com/datawhalechina/torch-rechub/tree/main/examples/matching"
TRAIN_BUDGET_S = 60.0      # the defaults' target: each dataset trained in <= 60 s on 2 cores
DEFAULTS_TARGET = 1.05     # defaults: HR@50 >= 1.05x EASE on every dataset
TUNED_TARGET = 1.10        # tune with a 10-minute budget: >= 1.10x EASE on every dataset
TUNE_BUDGET = "10m"

# The mean-pooled YoutubeDNN baseline (the defaults with the history pooled by a plain mean), the
# defaults before issue #11, then one change at a time on top of the shipped defaults: what each
# option adds, per dataset.
BASELINE = "youtubednn-mean"
VARIANTS: dict[str, dict[str, Any]] = {
    BASELINE: {"history_encoder": "mean"},
    "pre-#11 defaults": {"history_encoder": "mean", "history_len": 5, "use_user_id": True, "epochs": 4,
                         "hidden": [256], "temperature": 0.05},
    "hidden layer 256": {"hidden": [256]},
    "temperature 0.05": {"temperature": 0.05},
    "recency": {"history_encoder": "recency"},
    "transformer": {"history_encoder": "transformer"},
    "user id off": {"use_user_id": False},
    "dim 128": {"dim": 128},
    "dssm": {"model": "dssm"},
    "one interest": {"interests": 1},
    "item init transitions": {"item_init": "transitions"},
    "neighbours off": {"neighbour_weight": 0},
}
REFERENCES = ("popularity", "ease", "rechub-dssm", "rechub-youtubednn")
ALL_ROWS = (*REFERENCES, "ours", *VARIANTS, "tuned")


@dataclass
class QualityConfig:
    datasets: tuple[str, ...] = tuple(bench_data.DATASETS)
    only: tuple[str, ...] = ()               # row names to run (default: all)
    skip_rechub: bool = False
    ease_lambda: float = DEFAULT_EASE_LAMBDA
    tune_budget: str = TUNE_BUDGET
    venv: Path = REPO / ".bench" / "rechub-venv"
    rechub_num_workers: int | None = None    # None = the examples' DataLoader default (8)
    rechub_epochs: int | None = None         # None = the examples' 10 epochs
    rechub_threads: int | None = None        # None = the same policy as our training (idle cores)
    our_overrides: dict[str, Any] = field(default_factory=dict)  # extra TrainConfig fields for every row of ours
    out_md: Path = REPO / "benchmarks" / "results" / "quality.md"
    store: Path = REPO / "benchmarks" / "results" / "quality.json"  # committed: the next run adds to it
    title: str = ""                          # the report's heading ("" = the standard one)
    seed: int = 0


@dataclass
class Row:
    name: str
    metrics: dict[str, Any]
    train_s: float | None
    notes: str = ""
    cpu_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def cpu_seconds() -> float:
    """User + system CPU of this process (all its threads) and reaped children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


# ----------------------------------------------------------------------------------------------
# torch-rechub in its own virtualenv


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_rechub_venv(venv: Path) -> Path:
    """Create the venv and install torch first, then torch-rechub, unless it is already complete."""
    py = _venv_python(venv)
    probe = ("import torch, torch_rechub, importlib.metadata as m; "
             f"assert torch.__version__.split('+')[0] == '{TORCH_VERSION}', torch.__version__; "
             f"assert m.version('torch-rechub') == '{RECHUB_VERSION}'")
    if py.exists() and subprocess.run([str(py), "-c", probe], capture_output=True).returncode == 0:
        return py
    log.info("creating %s (torch==%s, then torch-rechub==%s)", venv, TORCH_VERSION, RECHUB_VERSION)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "--quiet"]
    # torch FIRST: torch-rechub's own requirement would otherwise pull a different (CUDA) build
    subprocess.run(pip + [f"torch=={TORCH_VERSION}"], check=True)
    subprocess.run(pip + [f"torch-rechub=={RECHUB_VERSION}"], check=True)
    subprocess.run([str(py), "-c", probe], check=True)
    return py


def export_for_rechub(data: Any, split: Any, ev: EvalSet, dest: Path) -> None:
    """Write the runner's inputs: our train + valid rows (their held-out row = our valid row)."""
    dest.mkdir(parents=True, exist_ok=True)
    rows = pd.concat([split.train, split.valid], ignore_index=True)
    rows = rows.assign(user_id=rows["user_id"].astype(str))
    # stable sort: train rows precede the valid row on equal timestamps, as in our split
    rows = rows.sort_values(["user_id", "timestamp"], kind="stable")
    # a strictly increasing clock in OUR timeline order, so their (unstable) sort by time cannot
    # reorder same-second ratings and move a different row into their held-out slot
    pd.DataFrame({"user_id": rows["user_id"].to_numpy(), "item_id": rows["item_id"].astype(str).to_numpy(),
                  "timestamp": np.arange(len(rows), dtype=np.int64)}).to_csv(dest / "interactions.csv", index=False)

    users = data.users.copy()
    users.index = users.index.astype(str)
    col_map = {"gender": "gender", "age": "age", "occupation": "occupation", "zip": "zip_prefix"}
    u = pd.DataFrame({"user_id": users.index})
    for theirs, ours in col_map.items():
        src = ours if ours in users.columns else theirs
        u[theirs] = users[src].astype(str).to_numpy() if src in users.columns else ""
    u.to_csv(dest / "users.csv", index=False)

    # their item feature: the first genre (MovieLens) or the first categorical item feature
    cats = [s.name for s in data.item_features if s.kind == "categorical"]
    if "genres" in data.items.columns:
        first = data.items["genres"].map(lambda g: str(g[0]) if isinstance(g, (tuple, list)) and len(g) else "")
    elif cats:
        first = data.items[cats[0]].astype(str)
    else:
        first = pd.Series("", index=data.items.index)
    pd.DataFrame({"item_id": [str(i) for i in ev.item_ids], "cate_id": first.to_numpy()}).to_csv(
        dest / "items.csv", index=False)

    hists = ev.history_item_ids(np.arange(ev.n_users))
    pd.DataFrame({"user_id": ev.user_ids, "hist": ["|".join(str(i) for i in h) for h in hists]}).to_csv(
        dest / "eval_users.csv", index=False)


def run_rechub(cfg: QualityConfig, data: Any, split: Any, ev: EvalSet, names: list[str]) -> list[Row]:
    py = ensure_rechub_venv(cfg.venv)
    models = [n.removeprefix("rechub-") for n in names]
    log_path = cfg.venv.parent / "rechub-run.log"
    with tempfile.TemporaryDirectory(prefix="quality-rechub-") as tmp:
        inp, out = Path(tmp) / "in", Path(tmp) / "out"
        export_for_rechub(data, split, ev, inp)
        cmd = [str(py), str(REPO / "benchmarks" / "rechub_runner.py"), "--input", str(inp), "--output", str(out),
               "--models", ",".join(models)]
        if cfg.rechub_num_workers is not None:
            cmd += ["--num-workers", str(cfg.rechub_num_workers)]
        if cfg.rechub_epochs is not None:
            cmd += ["--epochs", str(cfg.rechub_epochs)]
        threads = cfg.rechub_threads if cfg.rechub_threads is not None else _same_threads_as_ours()
        if threads is not None:
            cmd += ["--threads", str(threads)]
        log.info("running torch-rechub (%s); log: %s", ", ".join(models), log_path)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        with open(log_path, "w") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=tmp)
        if proc.returncode != 0:
            tail = log_path.read_text().splitlines()[-15:]
            raise RuntimeError("torch-rechub runner failed:\n" + "\n".join(tail))
        rows = []
        for m in models:
            z = np.load(out / f"{m}.npz", allow_pickle=True)
            meta = json.loads((out / f"{m}.json").read_text())
            if z["item_ids"].tolist() != [str(i) for i in ev.item_ids] or z["user_ids"].tolist() != ev.user_ids.tolist():
                raise RuntimeError(f"torch-rechub {m}: exported ids do not line up with the evaluation set")
            metrics = evaluate_scores((z["user_emb"], z["item_emb"]), ev, ks=KS)
            note = (f"prep {meta['prep_s']:.1f}s + fit {meta['fit_s']:.1f}s; {meta['epoch']} epochs, "
                    f"batch {meta['batch_size']}, lr {meta['learning_rate']:g}, DataLoader workers {meta['num_workers']}, "
                    f"torch threads {meta['threads']}")
            rows.append(Row(f"rechub-{m}", metrics, float(meta["train_s"]), note, extra=meta,
                            cpu_s=meta.get("train_cpu_s")))
    return rows


def _same_threads_as_ours() -> int | None:
    """The torch thread count our training job would pick now (the idle cores): both sides then run
    under the same policy; the thread count changes speed only, never results."""
    try:
        from training.train import idle_cores
    except ImportError:
        return None
    return int(idle_cores())


# ----------------------------------------------------------------------------------------------
# ours


def _train_and_score(spec: str, data: Any, split: Any, ev: EvalSet, name: str, workdir: Path,
                     fields: dict[str, Any], notes: str = "") -> Row:
    from towers.checkpoint import load_checkpoint
    from training.train import TrainConfig
    from training.train import run as train_run

    tc = TrainConfig.from_dict({"data": spec, "artifacts": str(workdir / name), "quiet": True, **fields})
    c0, t0 = cpu_seconds(), time.perf_counter()
    try:
        res = train_run(tc)
    except Exception as exc:  # one broken configuration must not sink the whole comparison
        log.exception("%s failed", name)
        return Row(name, {}, None, f"failed: {type(exc).__name__}: {exc}")
    train_s, cpu_s = time.perf_counter() - t0, cpu_seconds() - c0
    metrics = evaluate_model(load_checkpoint(res.model_path), data, split, which="test", ks=KS, ev=ev)
    doc = json.loads((res.dir / "config.json").read_text())
    best_epoch = res.metrics.get("best_epoch")
    note = "; ".join(x for x in (notes, f"best epoch {best_epoch} of {doc['train']['epochs']}") if x)
    log.info("%s: masked HR@50 %.4f in %.1fs", name, metrics["masked"]["HR@50"], train_s)
    return Row(name, metrics, train_s, note, cpu_s=cpu_s,
               extra={"train": doc["train"], "derived": doc.get("derived", {}),
                      "valid_hr": res.metrics.get(f"best_valid_hr@{tc.eval_k}")})


def run_ours(cfg: QualityConfig, spec: str, data: Any, split: Any, ev: EvalSet, names: list[str],
             workdir: Path) -> list[Row]:
    rows: list[Row] = []
    ours: Row | None = None
    for name in ["ours", *[n for n in names if n != "ours"]] if "ours" in names else names:
        fields = dict(cfg.our_overrides) if name == "ours" else {**cfg.our_overrides, **VARIANTS[name]}
        if ours is not None and ours.metrics and all(ours.extra["train"].get(k) == v for k, v in fields.items()):
            # the defaults already chose exactly this (a derived setting): the same run, not trained twice
            rows.append(Row(name, ours.metrics, ours.train_s, "the defaults' own run (they derived this setting)",
                            cpu_s=ours.cpu_s, extra=ours.extra))
            continue
        row = _train_and_score(spec, data, split, ev, name, workdir, {"seed": cfg.seed, **fields})
        ours = row if name == "ours" else ours
        rows.append(row)
    return rows


def run_tuned(cfg: QualityConfig, spec: str, data: Any, split: Any, ev: EvalSet, workdir: Path) -> Row:
    """``twotower tune --budget 10m`` (validation rows only), then train the winner from best.json."""
    from training.config import TrainConfig
    from training.tune import TuneConfig, parse_budget, run_tune

    t0 = time.perf_counter()
    base = TrainConfig.from_dict({"data": spec, "artifacts": str(workdir / "tune"), "quiet": True,
                                  "seed": cfg.seed, **cfg.our_overrides})
    res = run_tune(TuneConfig(train=base, budget_s=parse_budget(cfg.tune_budget), out=str(workdir / "tune" / "out"),
                              quiet=True, fixed=tuple(cfg.our_overrides)))
    tune_s = time.perf_counter() - t0
    best = json.loads((res.out / "best.json").read_text())
    trials = pd.read_csv(res.out / "trials.csv")
    note = (f"tune {tune_s:.0f}s, {len(trials)} trials ({best.get('pruned', 0)} pruned), valid HR@50 {best['valid_hr@50']:.4f} "
            f"(defaults {best['defaults_valid_hr']:.4f}); winner {json.dumps(best['searched'], default=str)}")
    row = _train_and_score(spec, data, split, ev, "tuned", workdir, {**best["train"], "data": spec}, note)
    row.extra.update({"tune_s": tune_s, "trials": len(trials), "best": best,
                      "table": (res.out / "trials.md").read_text()})
    return row


# ----------------------------------------------------------------------------------------------
# one dataset


def run_dataset(cfg: QualityConfig, name: str) -> tuple[dict[str, Any], list[Row]]:
    spec = bench_data.ensure(name)
    wanted = list(cfg.only) or list(ALL_ROWS)
    if cfg.skip_rechub:
        wanted = [n for n in wanted if not n.startswith("rechub-")]
    data = load_data(spec)
    split = split_leave_last_out(data)
    ev = build_eval_set(data, split, "test")
    per_user = data.interactions.groupby("user_id").size()
    per_item = data.interactions.groupby("item_id").size().reindex(data.items.index, fill_value=0)
    stats = {"spec": spec.replace(f"{REPO}/", "").replace(str(REPO.parent), ".."), "users": len(data.users), "items": len(data.items),
             "interactions": len(data.interactions), "test_users": ev.n_users,
             "median_history": float(per_user.median()), "items_seen_le_5": float((per_item <= 5).mean()),
             "density": len(data.interactions) / max(1, len(data.users) * len(data.items)),
             "dropped": dict(data.dropped)}
    rows: list[Row] = []
    if "popularity" in wanted:
        c0, t0 = cpu_seconds(), time.perf_counter()
        scorer = popularity_scorer(split.train, ev)
        rows.append(Row("popularity", evaluate_scores(scorer, ev, ks=KS), time.perf_counter() - t0,
                        cpu_s=cpu_seconds() - c0))
    if "ease" in wanted:
        c0, t0 = cpu_seconds(), time.perf_counter()
        dtype = ease_dtype(ev.n_items)
        B = fit_ease(split.train, ev.item_ids, lam=cfg.ease_lambda, dtype=dtype)
        fit_s, cpu_s = time.perf_counter() - t0, cpu_seconds() - c0
        rows.append(Row("ease", evaluate_scores(ease_scorer(B, ev), ev, ks=KS), fit_s,
                        f"lambda {cfg.ease_lambda:g}, {np.dtype(dtype).name}", cpu_s=cpu_s))
        del B
    rechub = [n for n in wanted if n.startswith("rechub-")]
    if rechub:
        try:
            rows += run_rechub(cfg, data, split, ev, rechub)
        except Exception as exc:  # report it in the table rather than losing the other rows
            log.exception("torch-rechub failed on %s", name)
            rows += [Row(n, {}, None, f"failed: {type(exc).__name__}: {exc}") for n in rechub]
    ours = [n for n in wanted if n == "ours" or n in VARIANTS]
    with tempfile.TemporaryDirectory(prefix="quality-ours-") as tmp:
        if ours:
            rows += run_ours(cfg, spec, data, split, ev, ours, Path(tmp))
        if "tuned" in wanted:
            rows.append(run_tuned(cfg, spec, data, split, ev, Path(tmp)))
    for r in rows:
        if r.metrics:
            log.info("%s %-20s masked HR@50 %.4f  train %ss", name, r.name, r.metrics["masked"]["HR@50"],
                     _fmt(r.train_s, 1))
    return stats, rows


# ----------------------------------------------------------------------------------------------
# report


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}f}"


def _hr(row: dict[str, Any] | None) -> float | None:
    return row["metrics"]["masked"]["HR@50"] if row and row.get("metrics") else None


def _ratio(store: dict[str, Any], ds: str, name: str) -> float | None:
    rows = store["datasets"].get(ds, {}).get("rows", {})
    hr, ease = _hr(rows.get(name)), _hr(rows.get("ease"))
    return hr / ease if hr is not None and ease else None


def render_markdown(store: dict[str, Any]) -> str:
    names = [d for d in bench_data.DATASETS if d in store["datasets"]]
    lines = [
        f"# {store.get('title') or 'Retrieval quality over datasets, per-user leave-last-out'}",
        "",
        "One exact evaluator (`training/evaluate.py`) ranks the FULL catalogue for every model. Target = each "
        "user's last interaction; the model reads the history before it (train + valid rows). HR@K is "
        "seen-masked (every item the user had before the target set to -inf, never the target); one target "
        "per user, so HR@K = Recall@K. Ratios are to EASE (lambda 500) on the same split. "
        "The datasets (`benchmarks/datasets.py`):",
        "",
        "| dataset | data | users | items | interactions | median history | items seen <= 5 times | density |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in names:
        s = store["datasets"][d]["stats"]
        lines.append(f"| {d} | `{s['spec']}` | {s['users']:,} | {s['items']:,} | {s['interactions']:,} | "
                     f"{s['median_history']:.0f} | {s['items_seen_le_5']:.0%} | {s['density']:.4f} |")
    dropped = [f"{d}: {store['datasets'][d]['stats']['dropped']}" for d in names if store["datasets"][d]["stats"]["dropped"]]
    if dropped:
        lines += ["", "Rows the loader dropped (and logged, with their lines): " + "; ".join(dropped) + "."]

    # ---- headline
    def worst(row: str) -> tuple[float | None, str]:
        vals = [(r, d) for d in names if (r := _ratio(store, d, row)) is not None]
        if len(vals) < len(names) or not vals:
            return None, ""
        return min(vals)

    lines += ["", "## Headline: the worst ratio to EASE over the datasets", "",
              "| HR@50 / EASE | " + " | ".join(names) + " | worst |", "|---" * (len(names) + 2) + "|"]
    for row, label in (("ours", "ours, defaults"), (BASELINE, "mean-pooled YoutubeDNN (baseline)"),
                       ("tuned", f"ours, `twotower tune --budget {TUNE_BUDGET}` winner"),
                       ("rechub-youtubednn", "torch-rechub YoutubeDNN"), ("rechub-dssm", "torch-rechub DSSM"),
                       ("popularity", "popularity")):
        cells = [_fmt(_ratio(store, d, row), 2) for d in names]
        w, wd = worst(row)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | **{_fmt(w, 2)}**{f' ({wd})' if wd else ''} |")
    ses = []
    for d in names:
        rows, users = store["datasets"][d]["rows"], store["datasets"][d]["stats"]["test_users"]
        hr, ease = _hr(rows.get("ours")), _hr(rows.get("ease"))
        ses.append(float(np.sqrt(hr * (1 - hr) / users) / ease) if hr is not None and ease and users else None)
    lines.append("| 1 standard error of a ratio (binomial, test users) | " + " | ".join(_fmt(x, 3) for x in ses) + " | |")
    times = [store["datasets"][d]["rows"].get("ours", {}).get("train_s") for d in names]
    lines.append("| ours, defaults: train s (2 cores) | " + " | ".join(_fmt(t, 1) for t in times) +
                 f" | **{_fmt(max((t for t in times if t is not None), default=None), 1)}** |")
    w_def, wd_def = worst("ours")
    w_tun, wd_tun = worst("tuned")
    slowest = max((t for t in times if t is not None), default=None)
    if not any(store["datasets"][d]["rows"].get("rechub-dssm") for d in names):
        lines += ["", "torch-rechub was not re-run for this report (`--skip-rechub`; its two models take ~4 minutes "
                  "a dataset). Its last measurement, MovieLens-100k on 2026-11-23 with the same split and "
                  "evaluator: DSSM 0.61x EASE, YoutubeDNN 0.16x EASE (`git log -p benchmarks/results/quality.md`)."]
    lines += ["", "Targets:",
              f"- defaults >= {DEFAULTS_TARGET:.2f}x EASE on every dataset: worst {_fmt(w_def, 2)} ({wd_def or '-'}) -> "
              f"**{'met' if w_def is not None and w_def >= DEFAULTS_TARGET else 'NOT met'}**; each trained in <= "
              f"{TRAIN_BUDGET_S:.0f} s: slowest {_fmt(slowest, 1)} s -> "
              f"**{'met' if slowest is not None and slowest <= TRAIN_BUDGET_S else 'NOT met'}**",
              f"- `twotower tune` with a {TUNE_BUDGET} budget >= {TUNED_TARGET:.2f}x EASE on every dataset: worst "
              f"{_fmt(w_tun, 2)} ({wd_tun or '-'}) -> **{'met' if w_tun is not None and w_tun >= TUNED_TARGET else 'NOT met'}**",
              ""]

    # ---- what each option adds
    lines += ["## What each option adds (HR@50 / EASE)", "",
              "Each row is the shipped defaults (attention pooling with 3 interests per user, one linear layer "
              "per tower, temperature 0.12; history length, epochs and user id derived from the data; recall "
              "blending in the last item's neighbours at a weight chosen on the validation split) with the "
              "change its name says: `one interest` keeps one user vector (the defaults before multi-interest "
              "users; the encoders other than attention always have one); "
              "`youtubednn-mean` pools the history by a plain mean (the YoutubeDNN baseline); `pre-#11 defaults` is "
              "what shipped before (mean of the last 5 items, user id on, 4 epochs, a 256-unit ReLU layer, "
              "temperature 0.05); `hidden layer 256` and `temperature 0.05` undo one of this change's defaults each; "
              "`recency` and `transformer` swap the encoder; `user id off` forces what the defaults derive (on for "
              "the MovieLens sets, off for the synthetic ones); `dim 128` doubles the retrieval dimension "
              "(and the index); `dssm` uses the DSSM towers (with their 256-unit ReLU layer); `item init "
              "transitions` starts the item table from the graph of items users had one right after the other "
              "(`--item-init transitions`, training/item_init.py); `neighbours off` ranks by the towers alone "
              "(`--neighbour-weight 0`; towers/neighbours.py).", "",
              "| variant | " + " | ".join(names) + " | worst |", "|---" * (len(names) + 2) + "|",
              "| **defaults** | " + " | ".join(_fmt(_ratio(store, d, "ours"), 2) for d in names) +
              f" | {_fmt(worst('ours')[0], 2)} |"]
    for v in VARIANTS:
        if all(_ratio(store, d, v) is None for d in names):
            continue  # not run for this report
        cells = [_fmt(_ratio(store, d, v), 2) for d in names]
        w, _ = worst(v)
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {_fmt(w, 2)} |")

    # ---- what the defaults derived from each dataset
    derived_rows = [(d, store["datasets"][d]["rows"].get("ours", {}).get("extra", {}).get("derived", {})) for d in names]
    if any(v for _, v in derived_rows):
        lines += ["", "## What the defaults derived from each dataset", "",
                  "Settings left unset are derived from the data at train time (logged, and kept in the model's "
                  "`config.json` under `derived`); a flag given explicitly always wins.", ""]
        for d, der in derived_rows:
            if der:
                lines.append(f"- {d}: " + "; ".join(f"`{k}` = {v['value']} ({v['why']})" for k, v in der.items()))

    # ---- per dataset
    for d in names:
        rows = store["datasets"][d]["rows"]
        ease = _hr(rows.get("ease"))
        lines += ["", f"## {d}", "",
                  "| model | HR@10 | HR@50 | HR@100 | NDCG@50 | MRR | HR@50 raw | train s | CPU s | HR@50 / EASE |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name in ALL_ROWS:
            r = rows.get(name)
            if r is None:
                continue
            if not r.get("metrics"):
                lines.append(f"| {name} | " + " | ".join(["-"] * 9) + " |")
                continue
            mk, raw = r["metrics"]["masked"], r["metrics"]["raw"]
            lines.append(f"| {name} | {_fmt(mk['HR@10'])} | **{_fmt(mk['HR@50'])}** | {_fmt(mk['HR@100'])} | "
                         f"{_fmt(mk['NDCG@50'])} | {_fmt(mk['MRR'])} | {_fmt(raw['HR@50'])} | {_fmt(r['train_s'], 1)} | "
                         f"{_fmt(r.get('cpu_s'), 1)} | {_fmt(mk['HR@50'] / ease, 2) if ease else '-'} |")
        notes = [(n, rows[n]["notes"]) for n in ALL_ROWS if n in rows and rows[n].get("notes")]
        verdict = ((rows.get("tuned") or {}).get("extra") or {}).get("best", {}).get("against_the_defaults")
        if verdict:  # the tune's noise rule (training/tune.py): why the winner did or did not replace the defaults
            notes.append(("tuned, against the defaults", verdict["why"]))
        if notes:
            lines += [""] + [f"- {n}: {t}" for n, t in notes]
        when = store["datasets"][d].get("env", {})
        if when:
            lines += ["", f"Run {when.get('when', '?')} with `python benchmarks/quality.py{when.get('args', '')}` "
                      f"(1-min load average {when.get('loadavg_start', [0])[0]:.1f} at the start, "
                      f"{when.get('loadavg_end', [0])[0]:.1f} at the end)."]
    lines += [
        "",
        "## How each reference was trained",
        "",
        "- popularity: train-split interaction counts. EASE: closed form, lambda = 500, on the binary train-split "
        "user-item matrix (only items with train rows enter the inverse: the others' weights are exactly 0); "
        "scores = (history before the target) @ B.",
        f"- torch-rechub {RECHUB_VERSION} (`benchmarks/rechub_runner.py`, in `.bench/rechub-venv`): the recipes of its "
        f"own examples `run_ml_dssm.py` and `run_ml_youtube_dnn.py` ({RECHUB_EXAMPLES}): sparse user features "
        "user_id, gender, age, occupation, zip where the data has them (+ mean-pooled last-50 history sharing the "
        "item id table), embed_dim 16; negatives by `generate_seq_feature_match(sample_method=1, neg_ratio=3)` "
        "(count^0.75 popularity); DSSM: point-wise BCE (mode 0), item features id + first genre (or the first "
        "categorical item feature), towers [256,128,64] PReLU, batch 4096; YoutubeDNN: list-wise softmax over 1 "
        "positive + 3 negatives (mode 2), user MLP [128,64,16], temperature 0.02, batch 2048; both Adam lr 1e-4, "
        "weight decay 1e-6, 10 epochs, seed 2022. Their generator holds out each user's last row, so the runner "
        "gets our train + valid rows: it holds out our valid row and trains on exactly our train rows.",
        "- ours: `training.train.run` wall time, from loading the data to the end of training (validation each "
        "epoch included); `tuned`: the tune's own time is in its note, `train s` is the final training from "
        "`best.json`.",
        "",
        f"Machine: {store.get('env', {}).get('machine', '?')}; torch {store.get('env', {}).get('torch', '?')}.",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


def _env(argv_text: str, t_all: float, load_start: list[float]) -> dict[str, Any]:
    import torch

    machine = (f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, no GPU"
               if not torch.cuda.is_available() else f"{platform.machine()}, {os.cpu_count()} cores, CUDA")
    return {"machine": machine, "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "args": argv_text, "total_s": time.perf_counter() - t_all, "loadavg_start": load_start,
            "loadavg_end": list(os.getloadavg())}


def load_store(path: Path) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    return {"datasets": {}}


def run(cfg: QualityConfig, argv_text: str = "") -> dict[str, Any]:
    unknown = [n for n in cfg.only if n not in ALL_ROWS]
    unknown_ds = [d for d in cfg.datasets if d not in bench_data.DATASETS]
    if unknown or unknown_ds:
        raise ValueError(f"unknown row(s) {unknown} / dataset(s) {unknown_ds}; rows: {', '.join(ALL_ROWS)}; "
                         f"datasets: {', '.join(bench_data.DATASETS)}")
    store = load_store(cfg.store)
    if cfg.title:
        store["title"] = cfg.title
    for name in cfg.datasets:
        t_all, load_start = time.perf_counter(), list(os.getloadavg())
        stats, rows = run_dataset(cfg, name)
        entry = store["datasets"].setdefault(name, {"rows": {}})
        entry["stats"] = stats
        entry["rows"].update({r.name: r.__dict__ for r in rows})
        entry["env"] = _env(argv_text, t_all, load_start)
        store["env"] = entry["env"]
        # saved after every dataset: a long run that stops keeps what it finished
        cfg.store.parent.mkdir(parents=True, exist_ok=True)
        cfg.store.write_text(json.dumps(store, indent=2, default=str))
        if cfg.out_md:
            cfg.out_md.parent.mkdir(parents=True, exist_ok=True)
            cfg.out_md.write_text(render_markdown(store))
    log.info("wrote %s and %s", cfg.store, cfg.out_md)
    return store


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="", help=f"comma-separated subset of: {', '.join(bench_data.DATASETS)}")
    ap.add_argument("--only", default="", help=f"comma-separated subset of the rows: {', '.join(ALL_ROWS)}")
    ap.add_argument("--skip-rechub", action="store_true", help="do not build/run the torch-rechub virtualenv")
    ap.add_argument("--tune-budget", default=TUNE_BUDGET, help="the tuned row's search budget")
    ap.add_argument("--rechub-num-workers", type=int, default=None,
                    help="DataLoader workers for torch-rechub (default: its examples' default, 8)")
    ap.add_argument("--rechub-epochs", type=int, default=None, help="override torch-rechub's 10 epochs (smoke runs)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                    help="a TrainConfig field for every row of ours (experiments), e.g. --set history_len=20")
    ap.add_argument("--store", type=Path, default=QualityConfig.store, help="where results accumulate")
    ap.add_argument("--out", type=Path, default=QualityConfig.out_md, help="markdown report path")
    ap.add_argument("--title", default="", help="the report's heading (a separate --store/--out report)")
    ap.add_argument("--render", action="store_true", help="only rewrite the report from the store; trains nothing")
    args = ap.parse_args(argv)
    if args.render:
        args.out.write_text(render_markdown(load_store(args.store)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {k: json.loads(v) for k, _, v in (s.partition("=") for s in args.set)}
    cfg = QualityConfig(datasets=tuple(s for s in args.datasets.split(",") if s) or tuple(bench_data.DATASETS),
                        only=tuple(s.strip() for s in args.only.split(",") if s.strip()),
                        skip_rechub=args.skip_rechub, tune_budget=args.tune_budget,
                        rechub_num_workers=args.rechub_num_workers, rechub_epochs=args.rechub_epochs,
                        our_overrides=overrides, store=args.store, out_md=args.out, title=args.title)
    if cfg.only and not cfg.store.is_file() and cfg.out_md.is_file():
        # a partial run over an empty store would rewrite the existing report with only its own rows
        ap.error(f"{cfg.store} does not exist but {cfg.out_md} does: a run of only {', '.join(cfg.only)} would "
                 "replace that report with just these rows. Run every row (no --only), or give --store/--out "
                 "paths of a separate report")
    argv_text = "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    run(cfg, argv_text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
