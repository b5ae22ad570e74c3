"""ruff and mypy stay clean; a contributor sees the same result as `make lint`."""

from __future__ import annotations

from tests.ops._tools import run, tool

PACKAGES = ["towers", "training", "index", "service", "twotower"]


def test_ruff_reports_nothing() -> None:
    result = run([tool("ruff"), "check", "--no-cache", "."])
    assert result.returncode == 0, f"ruff found problems:\n{result.stdout}\n{result.stderr}"


def test_mypy_reports_nothing_on_the_packages() -> None:
    # --cache-dir=/dev/null: no .mypy_cache in the checkout, and no stale cache hiding an error
    result = run([tool("mypy"), "--cache-dir=/dev/null", *PACKAGES], timeout=600)
    assert result.returncode == 0, f"mypy found problems:\n{result.stdout}\n{result.stderr}"
