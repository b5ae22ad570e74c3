"""`twotower serve`: run the recall service with uvicorn.

Flags override the matching ``TT_*`` variables; they are exported to the environment (not passed
as objects) because uvicorn re-imports the app in every worker process, and each worker builds its
own ``Settings`` from the environment.
"""

from __future__ import annotations

import argparse
import math
import os


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the recall HTTP service (settings from TT_* env variables)",
                              description="Run the recall service. Every setting is a TT_* environment "
                                          "variable (see service/settings.py); these flags override a few.")
    p.add_argument("--host", help="bind address (TT_HOST, default 0.0.0.0)")
    p.add_argument("--port", type=int, help="port (TT_PORT, default 8000)")
    p.add_argument("--artifacts", help="artifacts directory holding bundles/ (TT_ARTIFACTS, default ./artifacts)")
    p.add_argument("--redis-url", help='Redis URL, "" for none (TT_REDIS_URL)')
    p.add_argument("--workers", type=int, help="uvicorn worker processes (TT_WORKERS, default 1)")
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
    uvicorn.run("service.app:app_from_env", factory=True, host=settings.host, port=settings.port,
                workers=settings.workers, log_config=None, access_log=False, proxy_headers=False,
                timeout_graceful_shutdown=math.ceil(settings.graceful_timeout_s), lifespan="on")
    return 0
