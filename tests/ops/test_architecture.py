"""The import directions README.md's "Architecture" section states (training -> towers, index -> towers,
service -> towers, index; nothing imports service; index and service never import training) hold,
checked by the import-linter contracts in pyproject.toml."""

from __future__ import annotations

import textwrap
from pathlib import Path

from tests.ops._tools import REPO_ROOT, run, tool


def _importlinter_section() -> str:
    """The [tool.importlinter] tables of pyproject.toml, verbatim, so the test checks the real contracts."""
    out: list[str] = []
    inside = False
    for line in (REPO_ROOT / "pyproject.toml").read_text().splitlines():
        if line.startswith("["):
            inside = line.strip("[]").startswith("tool.importlinter")
        if inside:
            out.append(line)
    assert out, "pyproject.toml has no [tool.importlinter] section"
    return "\n".join(out) + "\n"


def test_the_project_keeps_its_import_layering() -> None:
    result = run([tool("lint-imports")])
    assert result.returncode == 0, f"import-linter contracts broken:\n{result.stdout}\n{result.stderr}"
    assert "0 broken" in result.stdout


def _write_tree(root: Path, files: dict[str, str]) -> None:
    for pkg in ("towers", "training", "index", "service"):
        (root / pkg).mkdir()
        (root / pkg / "__init__.py").write_text("")
    for rel, body in files.items():
        (root / rel).write_text(textwrap.dedent(body))
    (root / "pyproject.toml").write_text(_importlinter_section())


def test_the_contracts_reject_a_service_that_imports_training(tmp_path: Path) -> None:
    """A copy of the contracts on a toy tree: it passes when clean and fails on each forbidden import,
    so a green architecture test really means the layering holds."""
    clean = tmp_path / "clean"
    clean.mkdir()
    _write_tree(clean, {
        "training/loop.py": "import towers\n",
        "index/build.py": "import towers\n",
        "service/app.py": "import index.build\nimport towers\n",
    })
    ok = run([tool("lint-imports")], cwd=clean, env={"PYTHONPATH": str(clean)})
    assert ok.returncode == 0, ok.stdout + ok.stderr

    bad = tmp_path / "bad"
    bad.mkdir()
    _write_tree(bad, {
        "training/loop.py": "import towers\nimport service.app\n",  # nothing may import service
        "index/build.py": "from training import loop\n",             # index never imports training
        "service/app.py": "import training.loop\n",                  # the service never imports training
    })
    broken = run([tool("lint-imports")], cwd=bad, env={"PYTHONPATH": str(bad)})
    assert broken.returncode != 0
    report = broken.stdout
    assert "0 kept, 3 broken" in report
    assert "training is not allowed to import service" in report
    assert "service is not allowed to import training" in report
    assert "index is not allowed to import training" in report
