# The two commands a newcomer runs (see README.md):
#   make demo   train on synthetic data, build the index, serve it, send a sample recall, stop
#   make test   the whole test suite against a real Redis (.ci/run runs exactly this)
#
# Everything runs inside a project virtualenv ($(VENV)); stamp files inside it make a second run
# skip the installs. `make distclean` removes the virtualenv.

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
# Python 3.11 when it is on PATH, otherwise python3 (checked to be >= 3.11 below)
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
PY := $(VENV)/bin/python
BIN := $(abspath $(VENV))/bin
RUN_STAMP := $(VENV)/.stamp-run
DEV_STAMP := $(VENV)/.stamp-dev
PYTEST_ARGS ?=
BENCH_ARGS ?=
PIP_FLAGS ?= $(if $(CI),--progress-bar off,)

.PHONY: help venv dev demo test lint bench clean distclean docker-build up down

help:
	@echo "make demo       train (synthetic), reindex, serve, send a sample recall, stop"
	@echo "make test       install dev extras and run the whole suite (starts Redis if none answers)"
	@echo "make lint       ruff + mypy + import-linter"
	@echo "make bench      run benchmarks/*.py (needs ../shared/data for MovieLens)"
	@echo "make venv       only create $(VENV) with CPU torch and the project"
	@echo "make clean      remove caches and ./artifacts;  make distclean also removes $(VENV)"
	@echo "make up / down  docker compose up / down (needs a Docker engine)"

# --- environment -------------------------------------------------------------------------------

venv: $(RUN_STAMP)
dev: $(DEV_STAMP)

# CPU torch first (scripts/install-torch.sh: local CPU wheel, else the PyTorch CPU index; never
# the CUDA build), then the project, editable. torch==2.13.0 then satisfies the project's torch
# requirement, so pip installs nothing more for it.
$(RUN_STAMP): pyproject.toml scripts/install-torch.sh
	@test -x $(PY) || { \
	  $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	    || { echo "error: Python >= 3.11 is required ($(PYTHON) is older); set PYTHON=..." >&2; exit 1; }; \
	  echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install $(PIP_FLAGS) --quiet --upgrade pip
	scripts/install-torch.sh $(PY)
	$(PY) -m pip install $(PIP_FLAGS) -e .
	@touch $@

$(DEV_STAMP): $(RUN_STAMP)
	$(PY) -m pip install $(PIP_FLAGS) -e '.[dev]'
	@touch $@

# --- the two commands --------------------------------------------------------------------------

demo: $(RUN_STAMP)
	PATH="$(BIN):$$PATH" $(BIN)/twotower demo

# with-redis.sh uses the Redis at TT_REDIS_URL (default 127.0.0.1:6379), or starts a throw-away
# redis-server there and stops it afterwards; pytest's exit status is make's.
test: $(DEV_STAMP)
	PATH="$(BIN):$$PATH" scripts/with-redis.sh $(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# --- helpers -----------------------------------------------------------------------------------

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy towers training index service twotower
	$(BIN)/lint-imports

# benchmarks/run.py when there is one, else every benchmarks/*.py that is an entry point (helpers are
# named _*.py or *_runner.py). MovieLens benchmarks read ../shared/data beside the checkout.
bench: $(RUN_STAMP)
	@set -e; export PATH="$(BIN):$$PATH"; \
	if [ -f benchmarks/run.py ]; then exec $(PY) benchmarks/run.py $(BENCH_ARGS); fi; \
	for f in benchmarks/*.py; do \
	  case "$$(basename "$$f")" in _*|*_runner.py) continue;; esac; \
	  [ -e "$$f" ] || { echo "no benchmarks/*.py yet"; exit 0; }; \
	  echo "== $$f"; $(PY) "$$f" $(BENCH_ARGS); done

clean:
	rm -rf artifacts .pytest_cache .mypy_cache .ruff_cache build *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

docker-build:
	docker compose build

up:
	docker compose up -d redis api

down:
	docker compose down
