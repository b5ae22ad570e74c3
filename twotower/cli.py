"""`twotower` console script: train, tune, eval, reindex, serve, demo.

Each stage package owns its subcommands in its own ``cli.py`` with ``register(subparsers)``; the
handlers import heavy modules (torch, faiss) lazily so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (module, subcommands it registers)
_STAGES = ["training.cli", "index.cli", "service.cli", "twotower.demo"]
# packages of the `jobs` extra (pyproject.toml): absent where only serving is installed (the api image)
_JOBS_ONLY = {"torch", "pandas", "pyarrow", "tqdm", "matplotlib"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twotower", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="{train,tune,eval,reindex,serve,demo}")
    sub.required = True
    for mod_name in _STAGES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:  # a stage not installed yet must not break the others
            if exc.name and mod_name.startswith(exc.name):
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the command line as given (train --nproc re-runs it under torchrun)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        rc = args.handler(args)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in _JOBS_ONLY:
            raise
        print(f"twotower {args.command}: error: needs {exc.name}, which is not installed here. The jobs need "
              "the `jobs` extra (pip install 'twotower[jobs]', CPU torch first: scripts/install-torch.sh); the "
              "api image carries only what serving needs: run the jobs from the jobs image", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # user-facing errors: one clear line, non-zero exit
        from towers.schema import DataError

        if isinstance(exc, (DataError, FileNotFoundError, ValueError)) or type(exc).__name__.endswith("Error") and getattr(exc, "user_facing", False):
            print(f"twotower {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
