"""``twotower tune``: a hyperparameter search (Optuna's TPE sampler) within a time budget, scored on
the VALIDATION rows only.

The test rows are never read. The search trains on the data with every user's last (test) row
removed: the trainer's own leave-last-out split of what remains then trains on the original train
rows, early-stops on the row before the validation row, and reports HR@K on the original validation
row. That figure is each trial's value. The winner's settings go to ``best.json``;
``twotower train --config best.json`` then trains it on the full train split as usual (validation
for early stopping, the test rows scored once at the end).

Each trial is one ``training.train.run`` in a scratch directory. The first trial is the defaults
(with whatever the user fixed), so the winner is never worse than the defaults on validation; and the
best trial replaces them only when its lead over them is beyond the validation users' noise (``min_z``
standard errors of the per-user difference, the rule the neighbour blend's weight follows): the best
of many noisy trials is ahead partly by luck, which a few hundred users cannot tell apart. After
every epoch a trial reports its validation HR@K (with the neighbour blend it chose, as served) to
Optuna's median pruner, which stops a trial that is below the median of the earlier trials at the
same epoch (the defaults alone, at first): a hopeless trial costs an epoch or two instead of a whole
run, so a budget holds more trials. A pruned trial is listed but never wins. A trial is only started
while the time left is at least the slowest finished trial so far, so the search ends within its
budget rather than at the first trial after it. Written next to ``best.json``: the
trials as ``trials.csv`` and ``trials.md`` (best first) and ``trials.png`` (value per trial and the
best so far).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.evaluate import MIN_Z, paired_difference

log = logging.getLogger(__name__)

_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*$")


def parse_budget(text: str) -> float:
    """``"10m"``, ``"90s"``, ``"1h30m"`` or a plain number of seconds -> seconds (> 0)."""
    m = _DURATION.match(str(text).lower())
    if not m or not any(m.groups()):
        raise ValueError(f"expected a duration such as 10m, 90s or 1h30m, got {text!r}")
    h, mins, s = (float(g) if g else 0.0 for g in m.groups())
    total = 3600 * h + 60 * mins + s
    if total <= 0:
        raise ValueError(f"the budget must be positive, got {text!r}")
    return total


# The searched settings: name -> how a trial picks it. Kept small enough for TPE to learn within
# ten minutes of ~30-60 s trials; every range holds the shipped default.
def suggest(trial: Any) -> dict[str, Any]:
    encoder = trial.suggest_categorical("history_encoder", ["recency", "attention", "mean"])
    # interests exist for attention pooling only (a conditional parameter: TPE models it per encoder)
    more = {"interests": trial.suggest_categorical("interests", [1, 2, 3, 4])} if encoder == "attention" else {}
    return {
        "lr": trial.suggest_float("lr", 1e-3, 1e-2, log=True),
        "temperature": trial.suggest_float("temperature", 0.05, 0.3, log=True),
        # 0: one linear layer (YoutubeDNN's default), 256: one ReLU layer of 256 (DSSM's)
        "hidden": (lambda h: (h,) if h else ())(trial.suggest_categorical("hidden", [0, 256])),
        "dim": trial.suggest_categorical("dim", [64, 128]),
        "history_len": trial.suggest_int("history_len", 5, 100, log=True),
        "history_encoder": encoder,
        "use_user_id": trial.suggest_categorical("use_user_id", [True, False]),
        "user_id_dropout": trial.suggest_float("user_id_dropout", 0.0, 0.5),
        "negatives": trial.suggest_categorical("negatives", ["mixed", "inbatch"]),
        "epochs": trial.suggest_int("epochs", 3, 12),
        "batch_size": trial.suggest_categorical("batch_size", [256, 512, 1024]),
        "dropout": trial.suggest_float("dropout", 0.0, 0.3),
        "item_init": trial.suggest_categorical("item_init", ["random", "transitions"]),
        **more,
    }


@dataclass
class TuneConfig:
    train: Any                                  # training.config.TrainConfig: the base of every trial
    budget_s: float = 600.0
    max_trials: int | None = None
    out: str | None = None                      # default: ARTIFACTS/tune/<time>/
    fixed: tuple[str, ...] = ()                 # settings the user gave: never searched
    seed: int = 0
    quiet: bool = False
    prune: bool = True                          # stop trials below the median at the same epoch
    # the best trial replaces the defaults only when it is ahead of them by this many standard errors
    # of the per-user difference on the validation rows (the neighbour blend's rule, for the same reason)
    min_z: float = MIN_Z
    # (optuna trial) -> settings; None = ``suggest`` (tests pass a tiny space)
    space: Callable[[Any], dict[str, Any]] | None = None


@dataclass
class TuneResult:
    out: Path
    best_value: float
    best_params: dict[str, Any]
    best_config: dict[str, Any]
    trials: list[dict[str, Any]]


def without_test_rows(data: Any) -> Any:
    """The same data minus each user's test row (the last of users with 3+ interactions)."""
    import dataclasses

    import pandas as pd

    from training.data import split_leave_last_out

    split = split_leave_last_out(data)
    kept = pd.concat([split.train, split.valid], ignore_index=True)
    return dataclasses.replace(data, interactions=kept)


def write_tuning_data(data: Any, dest: Path) -> str:
    """Write ``data`` (test rows already removed) as a csv:DIR the trainer reads; returns its spec.

    Only the feature columns go out, so the trials see exactly the features the real run will."""
    import dataclasses

    from training.data import load_data
    from training.train import write_data_snapshot

    items = data.items[[s.name for s in data.item_features]]
    users = data.users[[s.name for s in data.user_features]]
    write_data_snapshot(dataclasses.replace(data, items=items, users=users), dest)
    spec = f"csv:{dest.resolve()}"
    back = load_data(spec)
    if ([(s.name, s.kind) for s in back.item_features + back.user_features]
            != [(s.name, s.kind) for s in data.item_features + data.user_features]):
        raise RuntimeError(f"the tuning copy of the data lost or changed features ({back.item_features}, "
                           f"{back.user_features} vs {data.item_features}, {data.user_features})")
    return spec


def run_tune(cfg: TuneConfig) -> TuneResult:
    import optuna
    import pandas as pd

    from training.config import _RUNTIME_FIELDS, TrainConfig
    from training.data import load_data
    from training.train import run as train_run

    base: TrainConfig = cfg.train
    clash = set(_searched_names(cfg)) & set(_RECORD_FIELDS)
    if clash:
        raise ValueError(f"searched setting(s) {sorted(clash)} share a name with a column of the trials table")
    out = Path(cfg.out) if cfg.out else Path(base.artifacts) / "tune" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data = load_data(base.data, **base.data_options)
    tuning = without_test_rows(data)
    scratch = Path(tempfile.mkdtemp(prefix="tune-", dir=out))
    try:
        spec = write_tuning_data(tuning, scratch / "data")
        log.info("tuning on %s without its %d test rows (%d rows left); budget %.0fs",
                 base.data, len(data.interactions) - len(tuning.interactions), len(tuning.interactions), cfg.budget_s)
        del data, tuning
        k = base.eval_k
        # emb_dim follows dim unless the user set it (a searched dim must keep the tables tied)
        # and so do the interests with the encoder (3 with attention pooling, 1 with the others)
        base_doc = {**base.to_dict(), **{f: None for f in ("emb_dim", "interests") if f not in cfg.fixed}}
        records: list[dict[str, Any]] = []
        hits: dict[int, Any] = {}  # trial -> (users,) its hits on the validation rows, for the noise rule
        slowest = 0.0

        def objective(trial: optuna.Trial) -> float:
            nonlocal slowest
            # trial 0 is the defaults as they stand (derived values included); later trials search
            params = {} if trial.number == 0 else {n: v for n, v in _space(cfg)(trial).items() if n not in cfg.fixed}
            if {**base_doc, **params}.get("history_encoder") != "attention":  # one vector per user
                # several interests the user asked for keep the attention encoder; else no interests
                params.pop("history_encoder" if (base_doc.get("interests") or 1) > 1 else "interests", None)
            trial_cfg = TrainConfig.from_dict({**base_doc, **params, "data": spec, "data_options": {},
                                               "artifacts": str(scratch / f"trial{trial.number}"),
                                               "quiet": True, "resume": None, "stop_after_epoch": None})
            shown = params or {n: "default" for n in _searched_names(cfg)}
            reported: list[float] = []

            def report(record: dict[str, Any]) -> None:
                hr = served_valid_hr(record, k)
                if hr is None:
                    return
                reported.append(hr)
                trial.report(hr, record["epoch"])
                if trial.should_prune():
                    raise optuna.TrialPruned(f"valid HR@{k} {hr:.4f} after epoch {record['epoch']}")

            t0 = time.perf_counter()
            try:
                res = train_run(trial_cfg, on_epoch=report)
            except optuna.TrialPruned:
                secs = time.perf_counter() - t0
                records.append({"trial": trial.number, "value": float("nan"), "state": "pruned",
                                "epochs_run": len(reported), "last_epoch_hr": reported[-1], "seconds": secs,
                                "best_epoch": None, **shown})
                trial.set_user_attr("seconds", secs)
                raise
            finally:
                shutil.rmtree(scratch / f"trial{trial.number}", ignore_errors=True)
            secs = time.perf_counter() - t0
            slowest = max(slowest, secs)
            test = res.metrics.get("test") or {}
            metric = f"HR@{k}" if test and f"HR@{k}" in test["masked"] else "HR@50"
            value = float(test["masked"][metric]) if test else float("nan")
            if res.test_per_user is not None:
                hits[trial.number] = res.test_per_user["masked"][metric]
            records.append({"trial": trial.number, "value": value, "state": "complete",
                            "epochs_run": len(res.metrics.get("epochs", [])),
                            "last_epoch_hr": reported[-1] if reported else float("nan"), "seconds": secs,
                            "best_epoch": res.metrics.get("best_epoch"), **shown})
            trial.set_user_attr("seconds", secs)
            return value

        sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=8)
        # from trial 1 on, against the finished trials at the same epoch, from epoch 2 (its best so far)
        pruner = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=2) if cfg.prune \
            else optuna.pruners.NopPruner()
        study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner, study_name="twotower-tune")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        bar = _progress(cfg)

        def stop_when_out_of_time(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            elapsed = time.perf_counter() - t_start
            best = study.best_value if study.best_trial is not None else float("nan")
            pruned = sum(r["state"] == "pruned" for r in records)
            # a pruned trial's record is the last one: the objective wrote it before raising
            what = (f"pruned after epoch {records[-1]['epochs_run']} (valid HR@{k} {records[-1]['last_epoch_hr']:.4f} "
                    "then)" if trial.state == optuna.trial.TrialState.PRUNED
                    else f"valid HR@{k} {trial.value if trial.value is not None else float('nan'):.4f}")
            msg = (f"trial {trial.number}: {what} in {trial.user_attrs.get('seconds', 0):.0f}s; best {best:.4f} "
                   f"(trial {study.best_trial.number}); {_fmt_s(elapsed)} of {_fmt_s(cfg.budget_s)}")
            if bar is not None:
                bar.n = min(int(elapsed), bar.total)
                bar.set_postfix_str(f"trials {trial.number + 1} ({pruned} pruned), best {best:.4f}")
                bar.refresh()
            log.info(msg)
            if cfg.budget_s - elapsed < slowest:
                study.stop()  # the next trial would probably not finish inside the budget

        study.optimize(objective, n_trials=cfg.max_trials, timeout=cfg.budget_s, callbacks=[stop_when_out_of_time],
                       catch=(FloatingPointError,))
        if bar is not None:
            bar.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    done = [r for r in records if r.get("state") == "complete" and math.isfinite(r["value"])]
    if not done:
        raise RuntimeError("no trial finished inside the budget; give --budget more time")
    best = max(done, key=lambda r: r["value"])
    verdict = _beats_the_defaults(best, records, hits, k, cfg.min_z)
    if records[0] in done and best is not records[0] and not verdict["beats"]:
        log.info("keeping the defaults: %s", verdict["why"])
        best = records[0]
    best_params = {n: v for n, v in best.items() if n not in _RECORD_FIELDS and v != "default"}
    runtime = set(_RUNTIME_FIELDS) | {"data", "data_options"}
    best_cfg = {n: v for n, v in TrainConfig.from_dict({**base_doc, **best_params}).to_dict().items()
                if n not in runtime}
    best_cfg = {"data": base.data, "data_options": base.data_options, **best_cfg}
    doc = {"train": best_cfg, "searched": best_params, f"valid_hr@{k}": best["value"], "trial": best["trial"],
           "defaults_valid_hr": records[0]["value"] if records else None, "trials": len(records),
           "pruned": sum(r["state"] == "pruned" for r in records), "against_the_defaults": verdict,
           "budget_s": cfg.budget_s, "elapsed_s": time.perf_counter() - t_start,
           "note": "value = HR@K on the validation rows; the test rows were never read. "
                   "Train the winner with: twotower train --config best.json"}
    (out / "best.json").write_text(json.dumps(doc, indent=2, default=_plain))
    table = pd.DataFrame(records).sort_values("value", ascending=False)
    table.to_csv(out / "trials.csv", index=False)
    (out / "trials.md").write_text(_markdown(table, k))
    from training.plots import plot_trials

    plot_trials(records, out / "trials.png", k=k, title=f"twotower tune on {base.data}")
    log.info("best valid HR@%d %.4f (trial %d, defaults %.4f) after %d trials (%d pruned) in %s; wrote %s",
             k, best["value"], best["trial"], records[0]["value"], len(records), doc["pruned"],
             _fmt_s(time.perf_counter() - t_start), out / "best.json")
    return TuneResult(out, best["value"], best_params, best_cfg, records)


def _beats_the_defaults(best: dict[str, Any], records: list[dict[str, Any]], hits: dict[int, Any], k: int,
                        min_z: float) -> dict[str, Any]:
    """Whether the best trial is ahead of the defaults (trial 0) by more than ``min_z`` standard
    errors of their per-user difference on the validation rows: the best of many noisy trials is
    ahead of the rest partly by luck, and on a few hundred users a few hits decide the order."""
    if best["trial"] == 0:
        return {"beats": False, "why": "the defaults are the best trial"}
    if 0 not in hits or best["trial"] not in hits:
        return {"beats": True, "why": "no per-user hits to compare (no validation rows)"}
    ahead, se = paired_difference(hits[best["trial"]], hits[0])
    z = ahead / se if se > 0 else (math.inf if ahead > 0 else 0.0)
    figures = (f"trial {best['trial']}'s valid HR@{k} {best['value']:.4f} against the defaults' "
               f"{records[0]['value']:.4f}: {ahead:+.4f}, {z:.1f} standard errors ({se:.4f}) of the per-user difference")
    if z >= min_z:
        return {"beats": True, "gain": ahead, "se": se, "why": figures}
    return {"beats": False, "gain": ahead, "se": se, "why": f"{figures}, within {min_z:g} of no gain"}


# the columns of a trial's record that are not settings
_RECORD_FIELDS = ("trial", "value", "state", "epochs_run", "last_epoch_hr", "seconds", "best_epoch")


def served_valid_hr(record: dict[str, Any], k: int) -> float | None:
    """An epoch's validation HR@K as the model would be served: at the neighbour weight that epoch
    chose (``training/blend.py``) where it chose one, else the towers' own."""
    blend = record.get("neighbours")
    if blend:
        return float(blend[f"valid_hr@{k}"][f"{blend['weight']:g}"])
    hr = record.get("valid_hr")
    return None if hr is None else float(hr)


def _searched_names(cfg: TuneConfig) -> list[str]:
    """The names the search space sets, read off a trial that records its suggestions."""
    names: list[str] = []

    class _Names:
        def __getattr__(self, attr: str) -> Callable[..., Any]:
            def pick(name: str, *args: Any, **kw: Any) -> Any:
                names.append(name)
                choices = args[0] if args and isinstance(args[0], (list, tuple)) else kw.get("choices")
                return choices[0] if choices else (args[0] if args else 0)
            return pick

    _space(cfg)(_Names())
    return [n for n in names if n not in cfg.fixed]


def _space(cfg: TuneConfig) -> Callable[[Any], dict[str, Any]]:
    return cfg.space or suggest


def _progress(cfg: TuneConfig) -> Any:
    if cfg.quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=int(cfg.budget_s), desc="tune", unit="s", bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt}s {postfix}")


def _fmt_s(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def _plain(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _markdown(table: Any, k: int) -> str:
    cols = [c for c in table.columns if c != "trial"]
    names = {"value": f"valid HR@{k}", "last_epoch_hr": f"last epoch's valid HR@{k}"}
    lines = ["| trial | " + " | ".join(names.get(c, c) for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for _, r in table.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            cells.append("-" if isinstance(v, float) and v != v else
                         f"{v:.4f}" if isinstance(v, float) and c in ("value", "last_epoch_hr") else
                         f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append(f"| {int(r['trial'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
