"""Retrieval quality side by side on one split, scored by ONE exact evaluator.

    python benchmarks/quality.py [--data movielens:DIR] [--only a,b] [--skip-rechub]

Models: popularity and EASE (references), torch-rechub 0.9.0's DSSM and YoutubeDNN trained the way
its own MovieLens examples train them (in a separate virtualenv, see ``rechub_runner.py``), and
our DSSM / YoutubeDNN with each negative sampler (``training.train.run``). Every model is scored
by ``training.evaluate.evaluate_scores`` on the per-user leave-last-out TEST rows (history = train
+ valid rows; "masked" = every item seen before the target removed, never the target).
Writes ``benchmarks/results/quality.md`` (and ``.bench/quality.json`` with every number).

The torch-rechub virtualenv lives in ``.bench/rechub-venv`` (gitignored): created with this
interpreter, then ``pip install torch==2.13.0`` FIRST (so pip never pulls another torch build),
then ``pip install torch-rechub==0.9.0`` from PyPI.
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
if str(REPO) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from training.baselines import DEFAULT_EASE_LAMBDA, ease_scorer, fit_ease, popularity_scorer  # noqa: E402
from training.data import load_data, split_leave_last_out  # noqa: E402
from training.evaluate import EvalSet, build_eval_set, evaluate_model, evaluate_scores  # noqa: E402

log = logging.getLogger("quality")

DEFAULT_DATA = f"movielens:{REPO.parent / 'shared' / 'data' / 'ml-100k'}"
RECHUB_VERSION = "0.9.0"
TORCH_VERSION = "2.13.0"
SAMPLERS = ("uniform", "popularity", "inbatch", "mixed", "hard")
OUR_MODELS = tuple(f"{m}-{s}" for m in ("youtubednn", "dssm") for s in SAMPLERS)
ALL_MODELS = ("popularity", "ease", "rechub-dssm", "rechub-youtubednn") + OUR_MODELS
# not a model: the folding diagnostic on synthetic data with known clusters (two more trainings)
FOLDING = "folding"
FOLDING_DATA = "synthetic"
FOLDING_OPTIONS: dict[str, Any] = {"size": "small"}
KS = (10, 50, 100)
RECHUB_EXAMPLES = "https://github.com/datawhalechina/torch-rechub/tree/main/examples/matching"


@dataclass
class QualityConfig:
    data: str = DEFAULT_DATA
    only: tuple[str, ...] = ()               # model names to run (default: all)
    skip_rechub: bool = False
    ease_lambda: float = DEFAULT_EASE_LAMBDA
    venv: Path = REPO / ".bench" / "rechub-venv"
    rechub_num_workers: int | None = None    # None = the examples' DataLoader default (8)
    rechub_epochs: int | None = None         # None = the examples' 10 epochs
    rechub_threads: int | None = None        # None = the same policy as our training (idle cores)
    our_overrides: dict[str, Any] = field(default_factory=dict)  # extra TrainConfig fields for ours
    out_md: Path = REPO / "benchmarks" / "results" / "quality.md"
    out_json: Path = REPO / ".bench" / "quality.json"
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

    if "genres" in data.items.columns:
        first = data.items["genres"].map(lambda g: str(g[0]) if isinstance(g, (tuple, list)) and len(g) else "")
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
# our models


def run_ours(cfg: QualityConfig, data: Any, split: Any, ev: EvalSet, names: list[str], workdir: Path) -> list[Row]:
    try:
        from training.train import TrainConfig
        from training.train import run as train_run
    except ImportError as exc:  # the training job is not there (yet): report, do not fail the rest
        log.warning("training.train is not available (%s); skipping %s", exc, ", ".join(names))
        return [Row(n, {}, None, f"not run: training.train unavailable ({exc})") for n in names]
    from towers.checkpoint import load_checkpoint

    rows = []
    for name in names:
        model, sampler = name.split("-", 1)
        tc = TrainConfig(data=cfg.data, artifacts=str(workdir / name), model=model, negatives=sampler,
                         seed=cfg.seed, quiet=True, **cfg.our_overrides)
        c0, t0 = cpu_seconds(), time.perf_counter()
        try:
            res = train_run(tc)
        except Exception as exc:  # one broken configuration must not sink the whole comparison
            log.exception("%s failed", name)
            rows.append(Row(name, {}, None, f"failed: {type(exc).__name__}: {exc}"))
            continue
        train_s, cpu_s = time.perf_counter() - t0, cpu_seconds() - c0
        m = load_checkpoint(res.model_path)
        metrics = evaluate_model(m, data, split, which="test", ks=KS, ev=ev)
        epochs = res.metrics.get("best_epoch") if isinstance(res.metrics, dict) else None
        rows.append(Row(name, metrics, train_s, f"best epoch {epochs}" if epochs is not None else "",
                        extra={"train_config": tc.to_dict()}, cpu_s=cpu_s))
        log.info("%s: masked HR@50 %.4f in %.1fs", name, metrics["masked"]["HR@50"], train_s)
    return rows


def run_folding(cfg: QualityConfig, workdir: Path) -> list[dict[str, Any]]:
    """Share of top-50 items from clusters the user never touched: negatives vs positives only."""
    try:
        from training.train import TrainConfig
        from training.train import run as train_run
    except ImportError as exc:
        log.warning("training.train is not available (%s); skipping the folding diagnostic", exc)
        return []
    from towers.checkpoint import load_checkpoint
    from training.evaluate import folding_share

    data = load_data(FOLDING_DATA, **FOLDING_OPTIONS)
    split = split_leave_last_out(data)
    ev = build_eval_set(data, split, "test")
    out = []
    for negatives in ("mixed", "inbatch", "none"):
        tc = TrainConfig(data=FOLDING_DATA, data_options=dict(FOLDING_OPTIONS), artifacts=str(workdir / negatives),
                         model="youtubednn", negatives=negatives, seed=cfg.seed, quiet=True)
        res = train_run(tc)
        model = load_checkpoint(res.model_path)
        metrics = evaluate_model(model, data, split, which="test", ks=(50,), ev=ev)
        out.append({"negatives": negatives, "folding@50": folding_share(model, data, split, k=50, ev=ev),
                    "HR@50": metrics["masked"]["HR@50"]})
        log.info("folding: youtubednn negatives=%s share %.3f HR@50 %.3f", negatives, out[-1]["folding@50"],
                 out[-1]["HR@50"])
    pop = popularity_scorer(split.train, ev)
    out.append({"negatives": "(popularity baseline)", "folding@50": folding_share(pop, data, split, k=50, ev=ev),
                "HR@50": evaluate_scores(pop, ev, ks=(50,))["masked"]["HR@50"]})
    return out


# ----------------------------------------------------------------------------------------------
# report


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}f}"


def render_markdown(rows: list[Row], cfg: QualityConfig, n_users: int, n_items: int, env: dict[str, Any],
                    folding: list[dict[str, Any]] | None = None) -> str:
    by = {r.name: r for r in rows}
    ease = by.get("ease")
    ease_hr = ease.metrics["masked"]["HR@50"] if ease and ease.metrics else None
    lines = [
        "# Retrieval quality: MovieLens-100k, per-user leave-last-out",
        "",
        f"Data `{cfg.data.replace(str(REPO.parent), '..')}`; {n_users} test users, {n_items} catalogue items. "
        "One exact evaluator (`training/evaluate.py`) ranks the FULL catalogue for every model. "
        "Target = each user's last interaction; the model reads the history before it (train + valid rows). "
        "**masked** = every item seen before the target set to -inf (never the target); **raw** = no masking. "
        "One target per user, so HR@K = Recall@K. MRR is full-rank (not truncated). "
        "Ties rank in catalogue order.",
        "",
        "| model | HR@10 | HR@50 | HR@100 | HR@10 raw | HR@50 raw | HR@100 raw | NDCG@50 | MRR | train s | CPU s "
        "| HR@50 / EASE | time / rechub | CPU / rechub |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r.metrics:
            lines.append(f"| {r.name} | " + " | ".join(["-"] * 13) + " |")
            continue
        mk, raw = r.metrics["masked"], r.metrics["raw"]
        ratio_ease = _fmt(mk["HR@50"] / ease_hr, 2) if ease_hr else "-"
        ratio_time = ratio_cpu = "-"
        if r.name.split("-", 1)[0] in ("dssm", "youtubednn"):
            ref = by.get(f"rechub-{r.name.split('-', 1)[0]}")
            if ref and ref.train_s and r.train_s:
                ratio_time = _fmt(r.train_s / ref.train_s, 2)
            if ref and ref.cpu_s and r.cpu_s:
                ratio_cpu = _fmt(r.cpu_s / ref.cpu_s, 2)
        lines.append(f"| {r.name} | {_fmt(mk['HR@10'])} | **{_fmt(mk['HR@50'])}** | {_fmt(mk['HR@100'])} | "
                     f"{_fmt(raw['HR@10'])} | {_fmt(raw['HR@50'])} | {_fmt(raw['HR@100'])} | "
                     f"{_fmt(mk['NDCG@50'])} | {_fmt(mk['MRR'])} | {_fmt(r.train_s, 1)} | {_fmt(r.cpu_s, 1)} | "
                     f"{ratio_ease} | {ratio_time} | {ratio_cpu} |")
    lines += ["", "HR@K, NDCG@50 and MRR without a suffix are seen-masked. `time / rechub` compares our model with "
              "torch-rechub's model of the same family (DSSM with DSSM, YoutubeDNN with YoutubeDNN). "
              "Training wall time is from the start of data preparation to the end of training "
              "(our runs: `training.train.run`, which also loads the data and validates each epoch; "
              "torch-rechub: sample generation + `MatchTrainer.fit`); EASE: the closed-form fit; popularity: counting. "
              "CPU s = user + system CPU seconds of the training process and its DataLoader workers over the "
              "same span: a cross-check that does not stretch when other work shares the cores.", ""]
    ours = [r for r in rows if r.metrics and r.name.split("-", 1)[0] in ("dssm", "youtubednn")]
    if ours and ease_hr:
        best = max(ours, key=lambda r: r.metrics["masked"]["HR@50"])
        ref = by.get(f"rechub-{best.name.split('-', 1)[0]}")
        hr = best.metrics["masked"]["HR@50"]
        best_s = float(best.train_s or 0.0)
        verdict = [f"- Best of ours: **{best.name}**, masked HR@50 {hr:.3f} vs EASE {ease_hr:.3f} "
                   f"({'meets' if hr >= ease_hr else 'below'} the EASE target), trained in {best_s:.1f}s "
                   f"({'under' if best_s < 60 else 'over'} the 60 s budget)"]
        if ref and ref.train_s:
            verdict[0] += (f"; wall time {best_s / ref.train_s:.2f}x torch-rechub {ref.name.removeprefix('rechub-')}'s "
                           f"{ref.train_s:.1f}s")
            if ref.cpu_s and best.cpu_s:
                verdict[0] += f", CPU time {best.cpu_s / ref.cpu_s:.2f}x ({best.cpu_s:.1f}s vs {ref.cpu_s:.1f}s)"
        fastest = min((r for r in rows if r.name.startswith("rechub-") and r.train_s), key=lambda r: r.train_s or 0.0,
                      default=None)
        if fastest and fastest is not ref and fastest.train_s:
            verdict[0] += f"; {best_s / fastest.train_s:.2f}x the faster torch-rechub model ({fastest.name})"
        lines += ["## Target", ""] + verdict + [""]
    if folding:
        lines += ["## Folding diagnostic (synthetic data with known clusters)", "",
                  f"`load_data(\"{FOLDING_DATA}\", size=\"{FOLDING_OPTIONS['size']}\")`, our YoutubeDNN with default "
                  "settings but the negatives below. Folding share = mean over test users of the share of their "
                  "seen-masked top-50 items whose cluster the user never touched in the train split "
                  "(`training.evaluate.folding_share`); lower is better.", "",
                  "| negatives | folding share@50 | HR@50 |", "|---|---|---|"]
        lines += [f"| {f['negatives']} | {f['folding@50']:.3f} | {f['HR@50']:.3f} |" for f in folding] + [""]
    notes = [r for r in rows if r.notes]
    if notes:
        lines += ["## Notes per model", ""] + [f"- {r.name}: {r.notes}" for r in notes] + [""]
    lines += [
        "## How each reference was trained",
        "",
        f"- popularity: train-split interaction counts. EASE: closed form, lambda = {cfg.ease_lambda:g}, on the "
        "binary train-split user-item matrix; scores = (history before the target) @ B.",
        f"- torch-rechub {RECHUB_VERSION} (`benchmarks/rechub_runner.py`, in `.bench/rechub-venv`): the recipes of its "
        f"own examples `run_ml_dssm.py` and `run_ml_youtube_dnn.py` ({RECHUB_EXAMPLES}): sparse user features "
        "user_id, gender, age, occupation, zip (+ mean-pooled last-50 history sharing the movie_id table), "
        "embed_dim 16; negatives by `generate_seq_feature_match(sample_method=1, neg_ratio=3)` (count^0.75 "
        "popularity); DSSM: point-wise BCE (mode 0), item features movie_id + first genre, towers [256,128,64] "
        "PReLU, batch 4096; YoutubeDNN: list-wise softmax over 1 positive + 3 negatives (mode 2), user MLP "
        "[128,64,16], temperature 0.02, batch 2048; both Adam lr 1e-4, weight decay 1e-6, 10 epochs, seed 2022. "
        "Their generator holds out each user's last row, so the runner gets our train + valid rows: it holds "
        "out our valid row and trains on exactly our train rows. Deviations: vocabularies cover the whole "
        "catalogue; numpy/random are seeded as well. Note torch-rechub 0.9.0's DSSM.forward has its "
        "temperature division commented out (`sigmoid(cosine)`), as shipped.",
        "",
        f"Machine: {env['machine']}; torch {env['torch']}; run at {env['when']} with "
        f"`python benchmarks/quality.py{env['args']}` ({env['total_s']:.0f}s in all; 1-min load average "
        f"{env['loadavg_start'][0]:.1f} at the start, {env['loadavg_end'][0]:.1f} at the end: wall times "
        "stretch when other work shares the cores).",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


def _with_train_only_mask(data: Any, split: Any, ev: EvalSet) -> EvalSet:
    """``ev`` with the mask rebuilt from train rows only (the valid row stays rankable)."""
    import dataclasses

    from training.data import Split

    only_train = build_eval_set(data, Split(train=split.train, valid=split.valid.iloc[0:0], test=split.test), "test")
    if only_train.user_ids.tolist() != ev.user_ids.tolist():
        raise RuntimeError("evaluation users differ between the two masks")
    return dataclasses.replace(ev, mask_indptr=only_train.mask_indptr, mask_cols=only_train.mask_cols)


def run(cfg: QualityConfig, argv_text: str = "") -> list[Row]:
    t_all = time.perf_counter()
    load_start = list(os.getloadavg())
    wanted = list(cfg.only) or [*ALL_MODELS, FOLDING]
    unknown = [n for n in wanted if n not in (*ALL_MODELS, FOLDING)]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(ALL_MODELS)}, {FOLDING}")
    if cfg.skip_rechub:
        wanted = [n for n in wanted if not n.startswith("rechub-")]
    data = load_data(cfg.data)
    split = split_leave_last_out(data)
    ev = build_eval_set(data, split, "test")
    rows: list[Row] = []
    if "popularity" in wanted:
        c0, t0 = cpu_seconds(), time.perf_counter()
        scorer = popularity_scorer(split.train, ev)
        count_s, cpu_s = time.perf_counter() - t0, cpu_seconds() - c0  # only the counting, not the evaluation
        rows.append(Row("popularity", evaluate_scores(scorer, ev, ks=KS), count_s, cpu_s=cpu_s))
    if "ease" in wanted:
        c0, t0 = cpu_seconds(), time.perf_counter()
        B = fit_ease(split.train, ev.item_ids, lam=cfg.ease_lambda)
        fit_s, cpu_s = time.perf_counter() - t0, cpu_seconds() - c0
        # the same EASE with only train-split items masked (the valid row left rankable): the protocol
        # behind the earlier 0.387, kept here so the two numbers can be told apart
        ev_train_mask = _with_train_only_mask(data, split, ev)
        alt = evaluate_scores(ease_scorer(B, ev), ev_train_mask, ks=(50,), mask_seen="masked")["masked"]["HR@50"]
        rows.append(Row("ease", evaluate_scores(ease_scorer(B, ev), ev, ks=KS), fit_s,
                        f"lambda {cfg.ease_lambda:g}; masked HR@50 is {alt:.3f} when only train-split items are "
                        "masked (the valid row left in the ranking)", cpu_s=cpu_s))
    rechub = [n for n in wanted if n.startswith("rechub-")]
    if rechub:
        rows += run_rechub(cfg, data, split, ev, rechub)
    ours = [n for n in wanted if n in OUR_MODELS]
    if ours:
        with tempfile.TemporaryDirectory(prefix="quality-ours-") as tmp:
            rows += run_ours(cfg, data, split, ev, ours, Path(tmp))
    folding: list[dict[str, Any]] = []
    if FOLDING in wanted:
        with tempfile.TemporaryDirectory(prefix="quality-folding-") as tmp:
            folding = run_folding(cfg, Path(tmp))
    for r in rows:
        if r.metrics:
            log.info("%-22s masked HR@50 %.4f  raw HR@50 %.4f  train %ss", r.name, r.metrics["masked"]["HR@50"],
                     r.metrics["raw"]["HR@50"], _fmt(r.train_s, 1))
    import torch

    env = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, no GPU"
           if not torch.cuda.is_available() else f"{platform.machine()}, {os.cpu_count()} cores, CUDA",
           "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "args": argv_text, "total_s": time.perf_counter() - t_all,
           # wall times are only comparable on a quiet machine: record how busy it was
           "loadavg_start": load_start, "loadavg_end": list(os.getloadavg())}
    if cfg.out_md:
        cfg.out_md.parent.mkdir(parents=True, exist_ok=True)
        cfg.out_md.write_text(render_markdown(rows, cfg, ev.n_users, ev.n_items, env, folding))
        log.info("wrote %s", cfg.out_md)
    if cfg.out_json:
        cfg.out_json.parent.mkdir(parents=True, exist_ok=True)
        cfg.out_json.write_text(json.dumps({"env": env, "rows": [r.__dict__ for r in rows], "folding": folding,
                                            "data": cfg.data, "ease_lambda": cfg.ease_lambda,
                                            "n_users": ev.n_users, "n_items": ev.n_items},
                                           indent=2, default=str))
    return rows


def rerender(json_path: Path, out_md: Path) -> None:
    """Rewrite the markdown from a run's saved JSON (no training): for report-format changes."""
    saved = json.loads(json_path.read_text())
    rows = [Row(**r) for r in saved["rows"]]
    first = next((r.metrics for r in rows if r.metrics), {})
    cfg = QualityConfig(data=saved.get("data", DEFAULT_DATA), ease_lambda=saved.get("ease_lambda", DEFAULT_EASE_LAMBDA))
    out_md.write_text(render_markdown(rows, cfg, int(saved.get("n_users", first.get("n_users", 0))),
                                      int(saved.get("n_items", first.get("n_items", 0))), saved["env"],
                                      saved.get("folding")))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA, help="data spec (default: movielens:../shared/data/ml-100k)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(ALL_MODELS)}, {FOLDING} "
                                               "(default: all)")
    ap.add_argument("--skip-rechub", action="store_true", help="do not build/run the torch-rechub virtualenv")
    ap.add_argument("--ease-lambda", type=float, default=DEFAULT_EASE_LAMBDA)
    ap.add_argument("--rechub-num-workers", type=int, default=None,
                    help="DataLoader workers for torch-rechub (default: its examples' default, 8)")
    ap.add_argument("--rechub-epochs", type=int, default=None, help="override torch-rechub's 10 epochs (smoke runs)")
    ap.add_argument("--out", type=Path, default=QualityConfig.out_md, help="markdown report path")
    ap.add_argument("--rerender", type=Path, default=None, metavar="JSON",
                    help="only rewrite the markdown from a saved run (.bench/quality.json); trains nothing")
    args = ap.parse_args(argv)
    if args.rerender:
        rerender(args.rerender, args.out)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = QualityConfig(data=args.data, only=tuple(s.strip() for s in args.only.split(",") if s.strip()),
                        skip_rechub=args.skip_rechub, ease_lambda=args.ease_lambda,
                        rechub_num_workers=args.rechub_num_workers, rechub_epochs=args.rechub_epochs, out_md=args.out)
    argv_text = "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    run(cfg, argv_text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
