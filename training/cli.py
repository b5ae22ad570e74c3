"""``twotower train`` and ``twotower eval``: argument parsing only; the work is in ``run(cfg)``.

Nothing heavy is imported at module level (``twotower --help`` must stay fast): torch, pandas and
the training job load inside the handler.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any


def _defaults() -> Any:
    # the single source of every default; training.config imports nothing heavy
    from training.config import TrainConfig

    return TrainConfig


def _checked(cast: Callable[[str], Any], ok: Callable[[Any], bool], expectation: str) -> Callable[[str], Any]:
    """An argparse type: parse with ``cast``, accept when ``ok``; both failures say what was expected."""

    def parse(text: str) -> Any:
        try:
            v = cast(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected {expectation}, got {text!r}") from exc
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expectation}, got {text!r}")
        return v

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _checked(float, lambda v: v > 0 and v != float("inf"), "a positive number")
_fraction = _checked(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
_non_negative_float = _checked(float, lambda v: v >= 0 and v != float("inf"), "a number >= 0")


def _hidden(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer sizes such as 256,128, got {text!r}") from exc
    if any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"layer sizes must be positive, got {text!r}")
    return sizes


def _on_off(text: str) -> bool:
    t = text.strip().lower()
    if t in ("on", "true", "yes", "1"):
        return True
    if t in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


def register(subparsers: Any) -> None:
    register_train(subparsers)
    try:
        from training.evaluate import register_eval
    except ModuleNotFoundError:  # the evaluator not installed: train still works
        return
    register_eval(subparsers)


def register_train(subparsers: Any) -> argparse.ArgumentParser:
    d = _defaults()()  # one TrainConfig instance: the single source of every default
    p = subparsers.add_parser(
        "train", help="train a DSSM / YoutubeDNN two-tower model and write a new model version",
        description="Train user and item towers with negative sampling on the per-user leave-last-out "
                    "train split, early-stop on validation HR@K (seen items masked), and write "
                    "ARTIFACTS/models/<version>/ (model.pt, last.pt, metrics.json, curves.png, config.json, "
                    "data/). models/LATEST names the version once it is complete.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data, help="synthetic | movielens:DIR | csv:DIR")
    g.add_argument("--synthetic-size", choices=("tiny", "small", "medium", "large"), default=None,
                   help="synthetic preset (default small)")
    g.add_argument("--synthetic-users", type=_positive_int, default=None, help="synthetic: number of users")
    g.add_argument("--synthetic-items", type=_positive_int, default=None, help="synthetic: number of items")
    g.add_argument("--synthetic-clusters", type=_positive_int, default=None, help="synthetic: interest clusters")
    g.add_argument("--synthetic-per-user", type=_positive_int, default=None,
                   help="synthetic: mean interactions per user")
    g.add_argument("--data-seed", type=int, default=0, help="synthetic: generator seed")
    g.add_argument("--artifacts", default=d.artifacts, help="artifacts directory (models/<version>/ goes there)")

    g = p.add_argument_group("model")
    g.add_argument("--model", choices=("dssm", "youtubednn"), default=d.model)
    g.add_argument("--dim", type=_positive_int, default=d.dim, help="retrieval embedding dimension")
    g.add_argument("--emb-dim", type=_positive_int, default=None,
                   help="id/history embedding width (default: --dim; must equal it to tie embeddings)")
    g.add_argument("--hidden", type=_hidden, default=d.hidden, help="tower MLP hidden sizes, comma-separated")
    g.add_argument("--dropout", type=_fraction, default=d.dropout)
    g.add_argument("--temperature", type=_positive_float, default=d.temperature, help="logits = cosine / T")
    g.add_argument("--history-len", type=_positive_int, default=d.history_len,
                   help="recent items pooled by the user tower")
    g.add_argument("--user-id-dropout", type=_fraction, default=d.user_id_dropout,
                   help="share of examples trained with the out-of-vocabulary user id (new-user path)")
    g.add_argument("--tie-embeddings", type=_on_off, default=d.tie_embeddings, metavar="on|off",
                   help="share the history table with the item output table while training")
    g.add_argument("--user-features", type=_on_off, default=d.use_user_features, metavar="on|off")
    g.add_argument("--item-features", type=_on_off, default=d.use_item_features, metavar="on|off")
    g.add_argument("--user-id", type=_on_off, default=d.use_user_id, metavar="on|off",
                   help="learn a per-user id embedding")

    g = p.add_argument_group("negatives and loss")
    g.add_argument("--negatives", choices=("inbatch", "uniform", "popularity", "mixed", "hard", "none"),
                   default=d.negatives, help="none = positives only (pulls pairs together, pushes nothing apart)")
    g.add_argument("--loss", choices=("softmax", "bpr", "bce"), default=d.loss)
    g.add_argument("--num-negatives", type=_positive_int, default=d.num_negatives,
                   help="sampled items shared by a batch (uniform, popularity, mixed, hard)")
    g.add_argument("--hard-negatives", type=_positive_int, default=d.hard_negatives,
                   help="hard: highest-scoring negatives kept per row")
    g.add_argument("--popularity-alpha", type=_non_negative_float, default=d.popularity_alpha,
                   help="popularity sampler: p ~ count^alpha")
    g.add_argument("--logq-correction", type=_on_off, default=d.logq_correction, metavar="on|off",
                   help="subtract log sampling probability from the logits")
    g.add_argument("--mask-history-hits", action="store_true",
                   help="also drop negatives that are in the user's training history (always on for hard)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=_positive_int, default=d.epochs, help="maximum epochs")
    g.add_argument("--batch-size", type=_positive_int, default=d.batch_size)
    g.add_argument("--lr", type=_positive_float, default=d.lr)
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default=d.lr_schedule,
                   help="cosine: decay the learning rate to 0 over --epochs")
    g.add_argument("--weight-decay", type=_non_negative_float, default=d.weight_decay)
    g.add_argument("--patience", type=_positive_int, default=d.patience,
                   help="stop after this many epochs without a better validation HR@K")
    g.add_argument("--eval-k", type=_positive_int, default=d.eval_k, help="K of the validation HR@K")
    g.add_argument("--seed", type=int, default=d.seed)

    g = p.add_argument_group("execution")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device)
    g.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: the cores not already busy)")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="VERSION|latest",
                   help="continue an interrupted run (its saved settings win over the ones given here)")
    g.add_argument("--stop-after-epoch", type=_non_negative_int, default=None, help=argparse.SUPPRESS)
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_train_command)
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    from training.config import TrainConfig

    data_options: dict[str, Any] = {}
    if args.data.strip().lower() == "synthetic":
        for key, val in (("size", args.synthetic_size), ("n_users", args.synthetic_users),
                         ("n_items", args.synthetic_items), ("n_clusters", args.synthetic_clusters),
                         ("interactions_per_user", args.synthetic_per_user)):
            if val is not None:
                data_options[key] = val
        data_options["seed"] = args.data_seed
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = dict(
        data=args.data, data_options=data_options, artifacts=args.artifacts, model=args.model, dim=args.dim,
        emb_dim=args.emb_dim, hidden=args.hidden, dropout=args.dropout, temperature=args.temperature,
        history_len=args.history_len, user_id_dropout=args.user_id_dropout, tie_embeddings=args.tie_embeddings,
        use_user_features=args.user_features, use_item_features=args.item_features, use_user_id=args.user_id,
        negatives=args.negatives, loss=args.loss, num_negatives=args.num_negatives,
        hard_negatives=args.hard_negatives, popularity_alpha=args.popularity_alpha,
        logq_correction=args.logq_correction, mask_history_hits=args.mask_history_hits, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, lr_schedule=args.lr_schedule, weight_decay=args.weight_decay,
        patience=args.patience,
        eval_k=args.eval_k, seed=args.seed, device=args.device, num_threads=args.threads, quiet=args.quiet,
        resume=args.resume, stop_after_epoch=args.stop_after_epoch,
    )
    assert set(values) <= fields
    return TrainConfig(**values)


def _train_command(args: argparse.Namespace) -> int:
    from training.train import run

    cfg = config_from_args(args)
    res = run(cfg)
    m = res.metrics
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
