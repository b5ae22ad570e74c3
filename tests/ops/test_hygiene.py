"""ruff and mypy stay clean; a contributor sees the same result as `make lint`."""

from __future__ import annotations

from tests.ops._tools import run, tool

PACKAGES = ["towers", "training", "index", "service", "twotower"]


def test_ruff_reports_nothing() -> None:
    result = run([tool("ruff"), "check", "--no-cache", "."])
    assert result.returncode == 0, f"ruff found problems:\n{result.stdout}\n{result.stderr}"


def test_mypy_reports_nothing_on_the_packages() -> None:
    result = run([tool("mypy"), *PACKAGES], timeout=600)
    assert result.returncode == 0, f"mypy found problems:\n{result.stdout}\n{result.stderr}"


def test_every_package_is_installed_by_a_non_editable_install() -> None:
    """`pip install .` (the Docker images) ships only what setuptools finds: a folder without
    __init__.py would be left out and `twotower` would fail outside the checkout."""
    import tomllib

    from setuptools import find_packages

    from tests.ops._tools import REPO_ROOT

    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    found = set(find_packages(where=str(REPO_ROOT), include=include))
    missing = [p for p in PACKAGES if p not in found]
    assert not missing, f"packages without __init__.py (not installed by `pip install .`): {missing}"
