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
PIP_FLAGS ?= $(if $(CI),--progress-bar off,)

.PHONY: help venv dev demo test lint bench soak clean distclean docker-build up down stack-test

help:
	@echo "make demo       train (synthetic), reindex, serve, send a sample recall, stop"
	@echo "make test       install dev extras and run the whole suite (starts Redis if none answers)"
	@echo "make lint       ruff + mypy + import-linter"
	@echo "make bench      run the benchmarks and assemble BENCHMARKS.md (MovieLens from ../shared/data)"
	@echo "make soak       the reliability soak against a local server and Redis"
	@echo "make venv       only create $(VENV) with CPU torch and the project"
	@echo "make clean      remove caches and ./artifacts;  make distclean also removes $(VENV)"
	@echo "make up / down  docker compose up / down (needs a Docker engine)"
	@echo "make stack-test build the images, run the compose stack, swap a bundle and kill a replica under load"

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
	$(PY) -m pip install $(PIP_FLAGS) -e '.[jobs]'
	@touch $@

$(DEV_STAMP): $(RUN_STAMP)
	$(PY) -m pip install $(PIP_FLAGS) -e '.[jobs,dev]'
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

# The benchmark scripts in order (each writes benchmarks/results/<name>.md), then assemble.py puts
# them together into BENCHMARKS.md. MovieLens benchmarks read ../shared/data beside the checkout.
# `make bench BENCHMARKS="index"` runs only some; `make soak` runs the reliability soak.
BENCHMARKS ?= quality index serve replicas scale
bench: $(RUN_STAMP)
	@set -e; export PATH="$(BIN):$$PATH"; \
	for name in $(BENCHMARKS); do \
	  f=benchmarks/$$name.py; [ -f "$$f" ] || { echo "skip $$f (not there)"; continue; }; \
	  echo "== $$f"; $(PY) "$$f"; done; \
	if [ -f benchmarks/assemble.py ]; then echo "== benchmarks/assemble.py"; $(PY) benchmarks/assemble.py; fi

# the soak starts its own server and private redis-server (see benchmarks/soak.py)
soak: $(RUN_STAMP)
	PATH="$(BIN):$$PATH" $(PY) benchmarks/soak.py

clean:
	rm -rf artifacts .pytest_cache .mypy_cache .ruff_cache build *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

docker-build:
	docker compose build

up:
	docker compose up -d redis api lb

down:
	docker compose down

# The compose stack for real (needs a Docker engine and Compose v2; see scripts/stack_test.py):
# builds the images, trains, reindexes, recalls through the balancer, publishes a second bundle and
# kills a replica under load, tears down. STACK_ARGS="--keep-images --monitoring" to keep images.
STACK_ARGS ?=
stack-test: $(RUN_STAMP)
	PATH="$(BIN):$$PATH" $(PY) scripts/stack_test.py $(STACK_ARGS)
