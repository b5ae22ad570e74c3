"""`twotower demo`: the whole pipeline once, end to end, on one machine (the Python side of `make demo`).

1. train a small model on the synthetic data set (or any ``--data`` spec),
2. embed the catalogue and publish an index bundle (the reindex job),
3. find a Redis: the one at TT_REDIS_URL if it answers, else a throw-away ``redis-server`` if one is
   installed, else the service's in-process cache (said out loud),
4. start the API (``twotower serve``) in a subprocess on a free port and wait for /readyz,
5. recall for a known user (twice: the second answer comes from the cache) and for a brand-new user
   who brings an inline history, and print the answers,
6. stop everything it started, whatever happened (the artifacts stay, so `twotower serve` works next).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from towers import MODELS, ModelName
from towers.artifacts import DEFAULT_REDIS_URL


def _env_artifacts() -> Path:
    return Path(os.environ.get("TT_ARTIFACTS") or "./artifacts")


@dataclass
class DemoConfig:
    """Every default of the demo in one place; `run(cfg)` is what the CLI and the tests call."""

    artifacts: Path = field(default_factory=_env_artifacts)
    data: str = "synthetic"
    model: ModelName = "youtubednn"
    epochs: int = 5
    # synthetic data: a preset of training.data.SYNTHETIC_SIZES, with the user and item counts
    # overriding it; 500 users x 300 items trains in well under a minute on 2 CPU cores
    size: str = "tiny"
    n_users: int | None = 500
    n_items: int | None = 300
    k: int = 10
    # None: TT_REDIS_URL, else the default local URL; "" forces the in-process cache
    redis_url: str | None = None
    # key prefix of the demo's cache entries (None = a fresh tt-demo-<hex>); deleted at the end
    redis_prefix: str | None = None
    # 0 = any free port on 127.0.0.1
    port: int = 0
    # items of the known user's recent history the brand-new user brings inline
    newcomer_history: int = 10
    ready_timeout_s: float = 90.0
    seed: int = 0


def _say(msg: str) -> None:
    print(msg, flush=True)


def _step(n: int, total: int, msg: str) -> None:
    _say(f"\n[{n}/{total}] {msg}")


# ----------------------------------------------------------------------------------- pipeline steps

def _train(cfg: DemoConfig) -> str:
    """Train and return the new model version."""
    from training.train import TrainConfig
    from training.train import run as train_run

    tcfg = TrainConfig(data=cfg.data, artifacts=str(cfg.artifacts), model=cfg.model, epochs=cfg.epochs,
                       seed=cfg.seed, data_options=_data_options(cfg))
    result = train_run(tcfg)
    return _version_of(result, "model_version")


def _reindex(cfg: DemoConfig) -> str:
    """Embed the catalogue with the newest model, publish a bundle and return its index version."""
    from index.reindex import ReindexConfig
    from index.reindex import run as reindex_run

    result = reindex_run(ReindexConfig(artifacts=Path(cfg.artifacts)))
    return _version_of(result, "index_version")


def _data_options(cfg: DemoConfig) -> dict[str, Any]:
    if cfg.data != "synthetic":
        return {}
    opts: dict[str, Any] = {"size": cfg.size, "seed": cfg.seed}
    if cfg.n_users is not None:
        opts["n_users"] = cfg.n_users
    if cfg.n_items is not None:
        opts["n_items"] = cfg.n_items
    return opts


def _version_of(result: Any, name: str) -> str:
    if isinstance(result, str):
        return result
    if isinstance(result, dict):
        return str(result[name])
    return str(getattr(result, name))


# ----------------------------------------------------------------------------------------- Redis

def _redis_answers(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[Any], name: str, grace_s: float = 15.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _say(f"      stopped {name} (pid {proc.pid})")


@contextmanager
def _redis_for_demo(cfg: DemoConfig) -> Iterator[str]:
    """Yield the Redis URL the API should use ("" = in-process cache); stop a server we started."""
    url = cfg.redis_url if cfg.redis_url is not None else os.environ.get("TT_REDIS_URL", DEFAULT_REDIS_URL)
    if url == "":
        _say("      TT_REDIS_URL is empty: the API uses its in-process cache")
        yield ""
        return
    if _redis_answers(url):
        _say(f"      using the Redis that answers at {url}")
        yield url
        return
    server = shutil.which("redis-server")
    if server is None:
        _say(f"      no Redis answers at {url} and redis-server is not installed:\n"
             "      the API runs with its in-process cache instead (TT_REDIS_URL=\"\"; single process only)")
        yield ""
        return
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="tt-demo-redis-")
    proc = subprocess.Popen([server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                             "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while not _redis_answers(started):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {port}")
            time.sleep(0.05)
        _say(f"      no Redis answered at {url}; started redis-server on 127.0.0.1:{port} (pid {proc.pid})")
        yield started
    finally:
        _stop(proc, "redis-server")
        shutil.rmtree(workdir, ignore_errors=True)


def _delete_prefix(url: str, prefix: str) -> None:
    """Remove the demo's keys from a Redis it did not start (SCAN, never FLUSHALL)."""
    if not url:
        return
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=500))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i:i + 500])
    except redis.RedisError:
        pass
    finally:
        client.close()


# ------------------------------------------------------------------------------------------- API

@contextmanager
def _api(cfg: DemoConfig, redis_url: str, prefix: str) -> Iterator[str]:
    """Run `twotower serve` in a subprocess; yield its base URL once /readyz answers 200."""
    import httpx

    port = cfg.port or _free_port()
    env = dict(os.environ)
    env.update({
        "TT_ARTIFACTS": str(Path(cfg.artifacts).resolve()),
        "TT_REDIS_URL": redis_url,
        "TT_REDIS_PREFIX": prefix,
        "TT_HOST": "127.0.0.1",
        "TT_PORT": str(port),
        "TT_WORKERS": "1",
        "TT_LOG_LEVEL": "WARNING",
    })
    # the server's own output goes to a file beside the artifacts: shown only when it fails to start
    log = (Path(cfg.artifacts) / "demo-api.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "twotower.cli", "serve"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + cfg.ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the API exited with status {proc.returncode} before it was ready:\n"
                                   f"{_tail(log.name)}")
            try:
                if httpx.get(f"{base}/readyz", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the API was not ready within {cfg.ready_timeout_s:.0f}s:\n{_tail(log.name)}")
            time.sleep(0.1)
        _say(f"      API ready at {base} (pid {proc.pid}; log {log.name})")
        yield base
    finally:
        _stop(proc, "the API")
        log.close()


def _tail(path: str, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ----------------------------------------------------------------------------------- the requests

def _catalogue(artifacts: Path, model_version: str) -> tuple[Any, Any]:
    """(items, interactions) DataFrames the model was trained on, for picking users and naming items."""
    import pandas as pd

    data = Path(artifacts) / "models" / model_version / "data"
    return pd.read_parquet(data / "items.parquet"), pd.read_parquet(data / "interactions.parquet")


def _describe(items: Any, item_id: Any) -> str:
    """A short human label for an item: its title when the catalogue has one, else its features."""
    try:
        row = items.loc[item_id]
    except KeyError:
        return ""
    for col in ("title", "name"):
        if col in row.index:
            return str(row[col])[:48]
    parts = []
    for col, val in row.items():
        if hasattr(val, "tolist"):  # numpy arrays / scalars from parquet
            val = val.tolist()
        if isinstance(val, (tuple, list)):
            val = "|".join(map(str, val))
        elif isinstance(val, float):
            val = f"{val:g}"
        parts.append(f"{col}={val}")
    return ", ".join(parts)[:48]


def _show(title: str, body: dict[str, Any], items: Any, elapsed_ms: float) -> None:
    extras = [f"model {body.get('model_version')}", f"index {body.get('index_version')}",
              f"cached={str(body.get('cached')).lower()}", f"{elapsed_ms:.1f} ms"]
    if body.get("fallback"):
        extras.append(f"fallback={body['fallback']}")
    _say(f"\n  {title}\n  ({'; '.join(extras)})")
    _say(f"  {'rank':>4}  {'item_id':>10}  {'score':>7}  item")
    for rank, hit in enumerate(body.get("items", []), start=1):
        _say(f"  {rank:>4}  {hit['item_id']!s:>10}  {hit['score']:7.3f}  {_describe(items, hit['item_id'])}")
    for warning in body.get("warnings") or []:
        _say(f"  warning: {warning}")


def _post(client: Any, path: str, payload: dict[str, Any]) -> tuple[dict[str, Any], float]:
    start = time.perf_counter()
    response = client.post(path, json=payload)
    elapsed = (time.perf_counter() - start) * 1000
    if response.status_code != 200:
        raise RuntimeError(f"POST {path} {json.dumps(payload)} -> {response.status_code}: {response.text}")
    return response.json(), elapsed


def _wire_id(item_id: Any) -> Any:
    """numpy scalars -> plain Python values for JSON."""
    return item_id.item() if hasattr(item_id, "item") else item_id


def _recalls(cfg: DemoConfig, base: str, model_version: str) -> dict[str, Any]:
    import httpx

    items, interactions = _catalogue(cfg.artifacts, model_version)
    # the known user: the one with the most interactions (deterministic tie-break on the id)
    counts = interactions.groupby("user_id").size()
    user = sorted(counts[counts == counts.max()].index.astype(str))[0]
    history = interactions[interactions["user_id"].astype(str) == user].sort_values("timestamp")["item_id"]
    recent = [_wire_id(v) for v in history.tail(cfg.newcomer_history).tolist()]

    out: dict[str, Any] = {"user": user}
    with httpx.Client(base_url=base, timeout=30.0) as client:
        payload: dict[str, Any] = {"user_id": user, "k": cfg.k}
        _say(f"\n  POST {base}/v1/recall {json.dumps(payload)}")
        first, ms = _post(client, "/v1/recall", payload)
        wire = dict(first, items=first["items"][:3] + (["..."] if len(first["items"]) > 3 else []))
        _say(f"  -> {json.dumps(wire)}")
        _show(f"known user {user} ({int(counts[user])} interactions, seen items excluded)", first, items, ms)
        again, ms = _post(client, "/v1/recall", payload)
        _say(f"\n  the same request again: cached={str(again.get('cached')).lower()}, {ms:.1f} ms")

        newcomer = f"demo-newcomer-{uuid.uuid4().hex[:6]}"
        payload = {"user_id": newcomer, "history": recent, "k": cfg.k}
        _say(f"\n  POST {base}/v1/recall {json.dumps(payload)}")
        fresh, ms = _post(client, "/v1/recall", payload)
        _show(f"brand-new user {newcomer}, unknown to the model, embedded from an inline history "
              f"(user {user}'s {len(recent)} most recent items)", fresh, items, ms)
    out.update(known=first, known_again=again, newcomer=fresh)
    return out


# -------------------------------------------------------------------------------------------- run

def run(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo; returns the answers it printed (the tests look at them)."""
    # the demo's own narration is the interesting output: keep the libraries' chatter down
    for noisy in ("httpx", "httpcore", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    total = 5
    started = time.monotonic()
    cfg.artifacts = Path(cfg.artifacts)
    _step(1, total, f"training a {cfg.model} model on {cfg.data!r} ({cfg.epochs} epochs) into {cfg.artifacts}/models")
    model_version = _train(cfg)
    _say(f"      model version {model_version}")

    _step(2, total, "embedding the catalogue and publishing an index bundle (reindex)")
    index_version = _reindex(cfg)
    _say(f"      index version {index_version} is now bundles/CURRENT")

    prefix = cfg.redis_prefix or f"tt-demo-{uuid.uuid4().hex[:8]}"
    with ExitStack() as stack:
        _step(3, total, "finding a Redis for the result cache")
        redis_url = stack.enter_context(_redis_for_demo(cfg))
        stack.callback(_delete_prefix, redis_url, prefix)

        _step(4, total, "starting the API (twotower serve)")
        base = stack.enter_context(_api(cfg, redis_url, prefix))

        _step(5, total, "sample recalls")
        answers = _recalls(cfg, base, model_version)
        _say("\nstopping what the demo started:")
    answers.update(model_version=model_version, index_version=index_version, redis_url=redis_url)
    _say(f"\ndone in {time.monotonic() - started:.0f}s. The model and bundle stay in {cfg.artifacts}; "
         f"serve them with:  TT_ARTIFACTS={cfg.artifacts} twotower serve")
    return answers


def _handler(args: argparse.Namespace) -> int:
    cfg = DemoConfig(data=args.data, model=args.model, epochs=args.epochs, k=args.k, port=args.port,
                     redis_url=args.redis_url, seed=args.seed, size=args.size, n_users=args.n_users,
                     n_items=args.n_items)
    if args.artifacts is not None:
        cfg.artifacts = Path(args.artifacts)
    run(cfg)
    return 0


def register(subparsers: Any) -> None:
    defaults = DemoConfig.__dataclass_fields__
    p = subparsers.add_parser(
        "demo", help="train, reindex, serve and query once, end to end (what `make demo` runs)",
        description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--artifacts", default=None,
                   help="artifacts directory (default: $TT_ARTIFACTS or ./artifacts)")
    p.add_argument("--data", default=defaults["data"].default, help="data spec (default: synthetic)")
    p.add_argument("--size", default=defaults["size"].default, help="synthetic size preset (default: tiny)")
    p.add_argument("--n-users", type=int, default=defaults["n_users"].default, help="synthetic users (default: 500)")
    p.add_argument("--n-items", type=int, default=defaults["n_items"].default, help="synthetic items (default: 300)")
    p.add_argument("--model", default=defaults["model"].default, choices=MODELS)
    p.add_argument("--epochs", type=int, default=defaults["epochs"].default)
    p.add_argument("--k", type=int, default=defaults["k"].default, help="items per recall")
    p.add_argument("--port", type=int, default=0, help="API port (default: a free one)")
    p.add_argument("--redis-url", default=None,
                   help='Redis for the cache (default: $TT_REDIS_URL or the local one; "" = in-process cache)')
    p.add_argument("--seed", type=int, default=defaults["seed"].default)
    p.set_defaults(handler=_handler)
