"""``twotower train`` and ``twotower eval``: argument parsing only; the work is in ``run(cfg)``.

Flags only parse: their defaults, choices and checks come from ``TrainConfig`` through
``towers.validation.add_flag``. Nothing heavy is imported at module level (``twotower --help`` must
stay fast): torch, pandas and the training job load inside the handler.
"""

from __future__ import annotations

import argparse
from typing import Any

from towers.validation import add_flag, config_from_args
from training.config import TrainConfig


def register(subparsers: Any) -> None:
    register_train(subparsers)
    register_tune(subparsers)
    try:
        from training.evaluate import register_eval
    except ModuleNotFoundError:  # the evaluator not installed: train still works
        return
    register_eval(subparsers)


def register_train(subparsers: Any) -> argparse.ArgumentParser:
    """Flags only parse; defaults, choices and every check come from TrainConfig (``add_flag``)."""
    p = subparsers.add_parser(
        "train", help="train a DSSM / YoutubeDNN two-tower model and write a new model version",
        description="Train user and item towers with negative sampling on the per-user leave-last-out "
                    "train split, early-stop on validation HR@K (seen items masked), and write "
                    "ARTIFACTS/models/<version>/ (model.pt, last.pt, metrics.json, curves.png, config.json, "
                    "data/). models/LATEST names the version once it is complete.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_train_flags(p)
    p.add_argument("--nproc", type=int, default=None,
                   help="train with N processes on this machine: a shortcut for `torchrun --standalone "
                        "--nproc-per-node N -m twotower.cli train ...` (several machines: run torchrun, see README)")
    p.set_defaults(handler=_train_command, parser=p)
    return p


def register_tune(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "tune", help="search hyperparameters on the validation rows within a time budget; writes best.json",
        description="Search the training settings (Optuna TPE) on the validation rows only (the test rows are "
                    "never read) within --budget, showing progress as it goes. Writes best.json, trials.csv, "
                    "trials.md and trials.png to --out (default ARTIFACTS/tune/<time>/); train the winner with "
                    "`twotower train --config best.json`. Training flags given here are fixed (not searched).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("search")
    g.add_argument("--budget", default="10m", help="time budget: 10m, 90s, 1h30m (no trial starts that would "
                                                   "probably not finish inside it)")
    g.add_argument("--trials", type=int, default=None, help="stop after this many trials (default: the budget decides)")
    g.add_argument("--out", default=None, help="directory for best.json and the trials table and plot")
    g.add_argument("--prune", choices=("on", "off"), default="on",
                   help="stop a trial after an epoch whose validation HR is below the median of the earlier "
                        "trials at that epoch (Optuna's MedianPruner), so the budget holds more trials")
    add_train_flags(p)
    p.set_defaults(handler=_tune_command, parser=p)
    return p


class _Given:
    """Mixed into every training flag's argparse action: records which settings the command line
    gave, so they win over a --config file (and are never searched by tune)."""

    dest: str

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        super().__call__(parser, namespace, values, option_string)  # type: ignore[misc]
        namespace.given_settings = frozenset(getattr(namespace, "given_settings", frozenset())) | {self.dest}


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """Every training setting as a flag (train and tune share them)."""

    def flag(name: str, field: str | None = None, **kw: Any) -> None:
        action = add_flag(g, name, TrainConfig, field, **kw)
        action.__class__ = type(f"Given{type(action).__name__}", (_Given, type(action)), {})

    p.set_defaults(given_settings=frozenset())
    g = p.add_argument_group("data")
    g.add_argument("--config", default=None, metavar="FILE",
                   help="settings from a JSON file: a tune's best.json or a model's config.json (flags given "
                        "here win over it)")
    flag("--data", help="synthetic | movielens:DIR | csv:DIR")
    # the synthetic generator's options (training.synthetic.make_synthetic checks them), not settings
    g.add_argument("--synthetic-size", choices=("tiny", "small", "medium", "large"), default=None,
                   help="synthetic preset (default small)")
    g.add_argument("--synthetic-users", type=int, default=None, help="synthetic: number of users")
    g.add_argument("--synthetic-items", type=int, default=None, help="synthetic: number of items")
    g.add_argument("--synthetic-clusters", type=int, default=None, help="synthetic: interest clusters")
    g.add_argument("--synthetic-per-user", type=int, default=None, help="synthetic: mean interactions per user")
    g.add_argument("--data-seed", type=int, default=0, help="synthetic: generator seed")
    flag("--artifacts", help="artifacts directory (models/<version>/ goes there)")
    flag("--stream", action="store_true",
         help="csv:DIR: read one large DIR/interactions.csv (or .parquet) in chunks, as a DIR/interactions/ "
              "directory of part files always is: memory bounded by the tables and one shard")
    flag("--shard-rows", help="streamed data: about this many interactions per shard (one shard in memory at a time)")
    flag("--eval-users", help="streamed data: users in the validation and test sample")

    g = p.add_argument_group("model")
    flag("--model")
    flag("--dim", help="retrieval embedding dimension")
    flag("--emb-dim", help="id/history embedding width (default: --dim; must equal it to tie embeddings)")
    flag("--hidden", help="tower MLP hidden sizes, comma-separated; '' = one linear layer (default: by model, "
                          "none for youtubednn, 256 for dssm)")
    flag("--dropout")
    flag("--temperature", help="logits = cosine / T")
    flag("--history-len", help="recent items the user tower reads (default: derived from the users' history "
                               "lengths)")
    flag("--history-encoder", help="how the history is pooled: mean (YoutubeDNN), recency-weighted mean, "
                                   "attention pooling or a small self-attention encoder")
    flag("--recency-half-life", help="recency encoder: starting half-life of its learned weights, in items")
    flag("--attention-heads", help="transformer encoder: attention heads per layer")
    flag("--attention-layers", help="transformer encoder: layers")
    flag("--interests", help="attention encoder: vectors per user, each searched and the results merged "
                             "(default: 3 with attention pooling, else 1)")
    flag("--user-id-dropout", help="share of examples trained with the out-of-vocabulary user id (new-user path)")
    flag("--tie-embeddings", help="share the history table with the item output table while training")
    flag("--item-init", help="the item id table's starting rows: random, or from the graph of items users had "
                             "one right after the other (pays on sequential data; data in memory only)")
    flag("--neighbour-weight", help="recall adds this times the cosine of the user's last item and an item over the "
                                    "pairs of items that sat next to each other in the histories (default: "
                                    "chosen on the validation split; 0 = the towers alone)")
    flag("--user-features", "use_user_features")
    flag("--item-features", "use_item_features")
    flag("--user-id", "use_user_id", help="learn a per-user id embedding (default: derived, on when users have "
                                           "long histories)")
    flag("--history", "use_history", help="pool the user's recent items in the user tower")
    flag("--item-id-embedding", help="DSSM: feed the item id to the item MLP (off: content features only)")
    flag("--multi-pooling", help="how a multi-valued feature's embeddings (genres, tags) are pooled")

    g = p.add_argument_group("negatives and loss")
    flag("--negatives", help="none = positives only (pulls pairs together, pushes nothing apart)")
    flag("--loss")
    flag("--num-negatives", help="sampled items shared by a batch (uniform, popularity, mixed, hard)")
    flag("--hard-negatives", help="hard: highest-scoring negatives kept per row")
    flag("--popularity-alpha", help="popularity sampler: p ~ count^alpha")
    flag("--logq-correction", help="subtract log sampling probability from the logits")
    flag("--mask-history-hits", action="store_true",
         help="also drop negatives that are in the user's training history (always on for hard)")

    g = p.add_argument_group("optimisation")
    flag("--epochs", help="maximum epochs (default: derived from the number of training examples)")
    flag("--max-steps", help="a budget: stop after this many optimiser steps in all (the epoch in progress ends "
                             "early; the cosine schedule decays over the budget), then validate, test and publish")
    flag("--batch-size", help="examples per step (with several processes: in all, split between them)")
    flag("--lr", help="AdamW learning rate of the dense parameters (MLPs, side-feature tables)")
    flag("--embedding-optimizer",
         help="how the id tables (user ids, history and item ids) learn: rowwise_adagrad and sparse_adam update "
              "only the rows a batch touched (a step costs in proportion to the batch); adamw updates every row "
              "every step (the old behaviour, kept as a reference)")
    flag("--embedding-lr", help="learning rate of the id tables (default: 0.1 for rowwise_adagrad, --lr otherwise)")
    flag("--lr-schedule", help="cosine: decay the learning rate to 0 over --epochs")
    flag("--weight-decay")
    flag("--patience", help="stop after this many epochs without a better validation HR@K")
    flag("--eval-k", help="K of the validation HR@K")
    flag("--seed")

    g = p.add_argument_group("execution")
    flag("--device")
    flag("--threads", "num_threads", help="CPU threads (default: the cores not already busy)")
    flag("--resume", nargs="?", const="latest", metavar="VERSION|latest",
         help="continue an interrupted run (its saved settings win over the ones given here)")
    flag("--stop-after-epoch", help=argparse.SUPPRESS)
    flag("--pause-at", metavar="EPOCH:STEP", help=argparse.SUPPRESS)
    flag("--quiet", action="store_true", help="no progress bar")
    flag("--loader-workers",
         help="DataLoader processes that build batches ahead of the training step (0: in the training process)")


def settings_file(path: str) -> dict[str, Any]:
    """Training settings from a JSON file: a flat mapping, or a document with a "train" section (a
    tune's best.json, a model's config.json). Settings that only say how a run executes (artifacts,
    device, threads, resume) are left to the command line."""
    import json
    from pathlib import Path

    from towers.schema import DataError
    from training.config import _RUNTIME_FIELDS

    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise DataError("settings file not found", path=path) from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"not a JSON settings file ({exc})", path=path) from exc
    values = doc.get("train", doc) if isinstance(doc, dict) else None
    if not isinstance(values, dict):
        raise DataError("expected a JSON object of training settings (or one with a \"train\" object)", path=path)
    unknown = sorted(k for k in values if k not in TrainConfig.model_fields)
    if unknown:
        raise DataError(f"unknown setting(s) {', '.join(unknown)}", path=path)
    values = {k: v for k, v in values.items() if k not in _RUNTIME_FIELDS}
    try:  # a bad value is the file's, not a flag's: say so
        TrainConfig(**values)
    except ValueError as exc:
        raise DataError(str(exc), path=path) from exc
    return values


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the parsed flags describe: TrainConfig's defaults, then the --config file,
    then every flag given on the command line. A bad value exits 2 naming its flag."""
    from_file = settings_file(args.config) if getattr(args, "config", None) else {}
    given = set(getattr(args, "given_settings", ()))
    synthetic_flags = any(getattr(args, f"synthetic_{k}", None) is not None
                          for k in ("size", "users", "items", "clusters", "per_user"))
    if "data" in given or synthetic_flags:  # other data: the file's data options do not apply
        from_file.pop("data_options", None)
    from_file = {k: v for k, v in from_file.items() if k not in given}
    if "data" in from_file:
        args.data = from_file.pop("data")
    data_options: dict[str, Any] = from_file.pop("data_options", None) or {}
    if args.data.strip().lower() == "synthetic" and (not data_options or synthetic_flags):
        data_options = {}
        for key, val in (("size", args.synthetic_size), ("n_users", args.synthetic_users),
                         ("n_items", args.synthetic_items), ("n_clusters", args.synthetic_clusters),
                         ("interactions_per_user", args.synthetic_per_user)):
            if val is not None:
                data_options[key] = val
        data_options["seed"] = args.data_seed
    return config_from_args(TrainConfig, args, args.parser, **from_file, data_options=data_options)


def _train_command(args: argparse.Namespace) -> int:
    from training.train import run

    cfg = train_config(args)  # bad settings fail here, before any process is started
    if args.nproc is not None:
        if args.nproc < 1:
            args.parser.error(f"argument --nproc: expected a positive integer, got {args.nproc}")
        if args.nproc > 1:
            from training.launch import launch

            return launch(args.nproc, cfg, list(args.argv))
    res = run(cfg)
    m = res.metrics
    if "rank" in m:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    if "interrupted_after_epoch" in m:
        print(f"stopped after epoch {m['interrupted_after_epoch']}: {res.dir} (continue with --resume {res.model_version})")
        return 0
    test = m.get("test") or {}
    line = f"model {res.model_version} written to {res.dir}"
    if test:
        line += (f"; test HR@50 {test['masked']['HR@50']:.4f} (seen masked), {test['raw']['HR@50']:.4f} raw; "
                 f"best epoch {m['best_epoch']}, {m['wall_time_s']:.1f}s")
    print(line)
    return 0


def _tune_command(args: argparse.Namespace) -> int:
    from training.config import _RUNTIME_FIELDS
    from training.tune import TuneConfig, parse_budget, run_tune

    try:
        budget = parse_budget(args.budget)
    except ValueError as exc:
        args.parser.error(f"argument --budget: {exc}")
    base = train_config(args)
    fixed = set(args.given_settings) | (set(settings_file(args.config)) if args.config else set())
    res = run_tune(TuneConfig(train=base, budget_s=budget, max_trials=args.trials, out=args.out,
                              fixed=tuple(sorted(fixed - set(_RUNTIME_FIELDS))), quiet=base.quiet,
                              prune=args.prune == "on"))
    pruned = sum(t["state"] == "pruned" for t in res.trials)
    print(f"best valid HR@{base.eval_k} {res.best_value:.4f} after {len(res.trials)} trials ({pruned} pruned) "
          f"(defaults {res.trials[0]['value']:.4f}); wrote {res.out}/best.json, trials.md, trials.png\n"
          f"train the winner: twotower train --config {res.out}/best.json")
    return 0
