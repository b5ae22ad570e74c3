"""`twotower reindex`: build and publish an index bundle, list bundles, or roll back.

Heavy modules (torch, faiss) are imported inside the handler so `twotower --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from towers.artifacts import DEFAULT_REDIS_PREFIX, DEFAULT_REDIS_URL
from towers.validation import add_flag, config_from_args


def _default_redis_url() -> str:
    # the same variable the service reads; an empty value means "no Redis"
    return os.environ.get("TT_REDIS_URL", DEFAULT_REDIS_URL)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "reindex", help="embed the catalogue, build the FAISS index, check recall, publish a bundle",
        description="Embed the whole catalogue with the item tower (new items from their content features), "
                    "build a FAISS inner-product index, measure recall@100 against exact search with real "
                    "users' vectors, and publish a versioned bundle atomically. --list and --rollback manage "
                    "published bundles.")
    # settings of the reindex job: default, parser and check come from ReindexConfig (add_flag)
    from index.reindex import ReindexConfig

    def flag(name: str, **kw: Any) -> None:
        add_flag(p, name, ReindexConfig, **kw)

    flag("--artifacts", default=os.environ.get("TT_ARTIFACTS", "artifacts"),
         help="artifacts directory (default: $TT_ARTIFACTS or ./artifacts)")
    flag("--model-version", help="model version (default: the one in models/LATEST)")
    flag("--items", help="CSV/Parquet with item_id + the model's item feature columns: adds new items and "
                         "replaces the features of known ones")
    flag("--factory", help="FAISS factory string (Flat, IVF1024,Flat, IVF1024,PQ16, HNSW32, SQ8, ...); "
                           "default: exact up to 100k items, IVF beyond")
    flag("--nprobe", help="IVF lists probed per query (default: the smallest that clears the recall floor)")
    flag("--ef-search", help="HNSW efSearch (default: the smallest that clears the recall floor)")
    flag("--recall-floor", help="refuse to publish below this recall@100 against exact search (default 0.95)")
    flag("--n-eval-users", help="users whose vectors measure recall (default 1000)")
    flag("--keep", help="bundles kept for rollback (default 5)")
    flag("--redis-url", default=_default_redis_url(),
         help="Redis to notify services on <prefix>:bundles (default: $TT_REDIS_URL or "
              f"{DEFAULT_REDIS_URL}; empty: no notification)")
    flag("--redis-prefix", default=os.environ.get("TT_REDIS_PREFIX", DEFAULT_REDIS_PREFIX),
         help=f"channel prefix (default: $TT_REDIS_PREFIX or {DEFAULT_REDIS_PREFIX})")
    flag("--threads", help="FAISS threads (default: all CPUs)")
    flag("--seed")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--rollback", nargs="?", const="", default=None, metavar="VERSION",
                      help="make the previous bundle (or VERSION) current again, and exit")
    mode.add_argument("--list", action="store_true", help="list published bundles with their manifests, and exit")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.set_defaults(handler=handle, parser=p)


def handle(args: argparse.Namespace) -> int:
    try:
        return _handle(args)
    except ValueError as exc:
        # the dispatcher prints one line; a FAISS or torch message can span several
        msg = str(exc)
        if "\n" in msg:
            raise ValueError(" ".join(msg.split())) from exc
        raise


def _handle(args: argparse.Namespace) -> int:
    from index import bundle as B

    if args.list:
        infos = B.list_bundles(args.artifacts)
        if args.json:
            print(json.dumps([{"version": i.version, "current": i.current, "path": str(i.path),
                               "manifest": i.manifest.to_dict() if i.manifest else None, "error": i.error}
                              for i in infos], indent=2))
            return 0
        if not infos:
            print(f"no bundles under {B.bundles_root(args.artifacts)}")
        for i in infos:
            print(_summary(i.version, i.manifest, i.current, i.error))
        return 0
    if args.rollback is not None:
        m = B.rollback(args.artifacts, to=args.rollback or None, redis_url=args.redis_url or None,
                       prefix=args.redis_prefix)
        print(json.dumps(m.to_dict(), indent=2) if args.json else
              f"current bundle is now {m.index_version} (model {m.model_version})")
        return 0

    from index.reindex import ReindexConfig, run

    m = run(config_from_args(ReindexConfig, args, args.parser, redis_url=args.redis_url or None))
    if args.json:
        print(json.dumps(m.to_dict(), indent=2))
    else:
        print(f"published {_summary(m.index_version, m, True, None)}")
    return 0


def _summary(version: str, m: Any, current: bool, error: str | None) -> str:
    mark = "*" if current else " "
    if m is None:
        return f"{mark} {version}  UNREADABLE: {error}"
    r = m.recipe
    knobs = "".join(f" {k}={r[k]}" for k in ("nprobe", "ef_search") if r.get(k) is not None)
    return (f"{mark} {version}  model={m.model_version}  items={m.n_items} (cold {m.n_cold_items})  dim={m.dim}  "
            f"recipe={r['factory']}{knobs}  recall@{m.recall_k}={m.recall:.4f}  created={m.created_at}")


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="twotower")
    register(parser.add_subparsers(dest="command"))
    ns = parser.parse_args()
    sys.exit(ns.handler(ns))
