"""`twotower serve`: run the recall service with uvicorn (several workers: service.balancer).

Flags override the matching ``TT_*`` variables; they are exported to the environment (not passed
as objects) because uvicorn re-imports the app in every worker process, and each worker builds its
own ``Settings`` from the environment.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the recall HTTP service (settings from TT_* env variables)",
                              description="Run the recall service. Every setting is a TT_* environment "
                                          "variable (see service/settings.py); these flags override a few.")
    p.add_argument("--host", help="bind address (TT_HOST, default 0.0.0.0)")
    p.add_argument("--port", type=int, help="port (TT_PORT, default 8000)")
    p.add_argument("--artifacts", help="artifacts directory holding bundles/ (TT_ARTIFACTS, default ./artifacts)")
    p.add_argument("--redis-url", help='Redis URL, "" for none (TT_REDIS_URL)')
    p.add_argument("--workers", type=int, help="worker processes (TT_WORKERS, default 1); with more than one, a "
                                              "supervisor hands each connection to the least busy worker")
    p.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from service.logging import configure_logging
    from service.settings import Settings

    overrides = {"TT_HOST": args.host, "TT_PORT": args.port, "TT_ARTIFACTS": args.artifacts,
                 "TT_REDIS_URL": args.redis_url, "TT_WORKERS": args.workers}
    for k, v in overrides.items():
        if v is not None:
            os.environ[k] = str(v)
    try:
        settings = Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ValueError(f"invalid setting TT_{str(first['loc'][0]).upper()}: {first['msg']}") from None
    configure_logging(settings.log_level)
    if settings.hugepages:
        _reexec_with_huge_pages()
    if settings.workers > 1:  # connection-balanced workers (see service.balancer for why not uvicorn's)
        from service.balancer import serve

        return serve(settings.host, settings.port, settings.workers, settings.graceful_timeout_s)
    uvicorn.run(APP, host=settings.host, port=settings.port, **uvicorn_options(settings.graceful_timeout_s))
    return 0


APP = "service.app:app_from_env"


def uvicorn_options(graceful_timeout_s: float) -> dict[str, Any]:
    """How the app runs under uvicorn, alone or as one of service.balancer's workers: the app
    factory, our JSON logging instead of uvicorn's, our access log, no proxy headers."""
    return {"factory": True, "log_config": None, "access_log": False, "proxy_headers": False,
            "timeout_graceful_shutdown": math.ceil(graceful_timeout_s), "lifespan": "on"}


_TUNABLE = "glibc.malloc.hugetlb=1"
_REEXEC_MARK = "TT_HUGEPAGES_REEXEC"


def _reexec_with_huge_pages() -> None:
    """Start this process again with glibc's malloc asking for transparent huge pages on its large
    allocations (the embedding tables and item arrays of a bundle, hundreds of MB read at random
    rows). With 4 KiB pages every such row is a TLB miss, and on a VM a TLB miss walks two page
    tables; measured on the 2-core benchmark VM (uncached recalls, 1M items): 11% more answers
    per second on average over five interleaved pairs of runs (-3% to +27%).

    glibc reads the tunable only at process start, hence the re-exec (same pid, same arguments).
    Nothing happens off Linux, before glibc 2.35, when THP is off ("never") or already on for all
    memory ("always"), or when GLIBC_TUNABLES already says what to do.
    """
    import logging
    import platform
    import sys

    log = logging.getLogger(__name__)
    if not sys.platform.startswith("linux") or os.environ.get(_REEXEC_MARK):
        return
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return
    lib, version = platform.libc_ver()
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return
    if lib != "glibc" or (major, minor) < (2, 35):
        return
    try:
        thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return
    if "[madvise]" not in thp:
        return
    env = dict(os.environ, GLIBC_TUNABLES=f"{tunables}:{_TUNABLE}" if tunables else _TUNABLE, **{_REEXEC_MARK: "1"})
    log.info("restarting with GLIBC_TUNABLES=%s (transparent huge pages for large arrays; TT_HUGEPAGES=false "
             "turns this off)", env["GLIBC_TUNABLES"])
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
