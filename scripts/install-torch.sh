#!/usr/bin/env bash
# Install the CPU build of torch into a virtualenv without downloading any CUDA packages.
#
#   scripts/install-torch.sh PYTHON        (PYTHON: the virtualenv's python, e.g. .venv/bin/python)
#
# Why this exists: `pip install torch` from PyPI pulls several GB of nvidia-* CUDA wheels even on a
# machine without a GPU. Two places give a CPU-only wheel instead, tried in this order:
#   1. a local wheel that pip already knows about (pip's `find-links`, e.g. /opt/wheels): we ask pip
#      for it with --no-index, so nothing is downloaded to find out;
#   2. the PyTorch CPU index, asking for the `+cpu` build explicitly; if that index cannot be
#      reached the install fails instead of silently falling back to the CUDA build on PyPI.
# torch's own small dependencies (filelock, sympy, networkx, jinja2, fsspec) come from the
# ordinary package index in both cases.
set -euo pipefail

PY=${1:?usage: install-torch.sh PYTHON}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

is_cpu_torch_installed() {
    # importing torch is the only reliable test: PyPI's default Linux build says "2.13.0" with no
    # "+cu" tag, yet links CUDA (torch.version.cuda is then set)
    "$PY" - "$TORCH_VERSION" <<'PYEOF' >/dev/null 2>&1
import sys
import torch
sys.exit(0 if torch.__version__.split("+")[0] == sys.argv[1] and torch.version.cuda is None else 1)
PYEOF
}

if is_cpu_torch_installed; then
    echo "install-torch: torch ${TORCH_VERSION} (CPU) is already installed"
    exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if "$PY" -m pip download --quiet --no-deps --no-index "torch==${TORCH_VERSION}" -d "$tmp" >/dev/null 2>&1 \
        && ls "$tmp"/torch-"${TORCH_VERSION}"+cpu-*.whl >/dev/null 2>&1; then
    wheel=$(ls "$tmp"/torch-"${TORCH_VERSION}"+cpu-*.whl)
    echo "install-torch: using the local CPU wheel $(basename "$wheel")"
    "$PY" -m pip install "$wheel"
else
    echo "install-torch: no local CPU wheel; installing torch==${TORCH_VERSION}+cpu from ${TORCH_CPU_INDEX}"
    if ! "$PY" -m pip install "torch==${TORCH_VERSION}+cpu" --extra-index-url "${TORCH_CPU_INDEX}"; then
        echo "install-torch: error: could not install the CPU build of torch ${TORCH_VERSION}." >&2
        echo "install-torch: put a CPU wheel where pip finds it (pip config find-links) or set TORCH_CPU_INDEX" >&2
        exit 1
    fi
fi

if ! is_cpu_torch_installed; then
    echo "install-torch: error: torch ${TORCH_VERSION} (CPU build) is not importable after the install" >&2
    exit 1
fi
