"""The README tells the truth: its two commands, its settings table, its command lines and links."""

from __future__ import annotations

import re
import shlex
from typing import Any

import pytest

from tests.ops._static import markdown_code_lines
from tests.ops._tools import REPO_ROOT, run
from tests.ops.test_docker import assert_valid_cli

README = (REPO_ROOT / "README.md").read_text()


def settings_fields() -> dict[str, Any]:
    from service.settings import Settings

    return dict(Settings.model_fields)


def readme_settings_table() -> dict[str, str]:
    """`TT_NAME` -> documented default, from the table under "## Settings"."""
    section = README.split("## Settings", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(TT_[A-Z0-9_]+)` \| ([^|]*) \|", section, re.MULTILINE)
    assert rows, "README has no settings table"
    return {name: cell.strip().strip("`") for name, cell in rows}


def test_the_two_commands_come_first() -> None:
    head = README.split("## Architecture", 1)[0]
    first_block = head.split("```", 2)[1]
    assert "make demo" in first_block and "make test" in first_block


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert ci.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in ci
    assert re.search(r"^exec make test\b", ci, re.MULTILINE)
    assert (REPO_ROOT / ".ci" / "run").stat().st_mode & 0o111, ".ci/run must be executable"


def test_make_targets_do_what_the_readme_says(tmp_path: Any) -> None:
    """`make -n` (dry run) from a pretend-fresh checkout: the venv steps come first, CPU torch before
    the project, and the commands end in the demo / the Redis-wrapped pytest."""
    venv = tmp_path / "venv"
    for target, last in (("demo", "twotower demo"), ("test", "scripts/with-redis.sh")):
        result = run(["make", "-n", target, f"VENV={venv}"])
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        pos = {key: next(i for i, line in enumerate(lines) if key in line)
               for key in ("-m venv", "scripts/install-torch.sh", "pip install", last)}
        assert pos["-m venv"] < pos["scripts/install-torch.sh"] < max(
            i for i, line in enumerate(lines) if "pip install" in line and "-e" in line) < pos[last]
        if target == "test":
            assert any("-e '.[jobs,dev]'" in line for line in lines)
            assert "pytest" in lines[pos[last]]


def test_settings_table_lists_every_setting_with_its_default() -> None:
    fields = settings_fields()
    documented = readme_settings_table()
    expected = {f"TT_{name.upper()}" for name in fields}
    assert set(documented) == expected, (
        f"missing from README: {sorted(expected - set(documented))}; "
        f"not settings: {sorted(set(documented) - expected)}")
    for name, info in fields.items():
        doc = documented[f"TT_{name.upper()}"]
        default = info.default
        if hasattr(default, "get_secret_value"):
            default = default.get_secret_value()
        if isinstance(default, bool):
            assert doc == str(default).lower(), (name, doc, default)
        elif isinstance(default, (int, float)):
            assert float(doc.replace("_", "")) == float(default), (name, doc, default)
        elif default == "":
            assert doc in ("(empty)", '""'), (name, doc)
        else:
            assert doc == str(default) or doc == f"./{default}", (name, doc, default)


def test_every_tt_variable_the_readme_mentions_is_a_setting() -> None:
    """... or one docker-compose.yml reads for itself (replica count, Redis memory, build network)."""
    known = {f"TT_{name.upper()}" for name in settings_fields()}
    compose = set(re.findall(r"\$\{(TT_[A-Z0-9_]+)", (REPO_ROOT / "docker-compose.yml").read_text()))
    mentioned = set(re.findall(r"\bTT_[A-Z0-9_]+\b", README))
    assert mentioned - known - compose == set()


_CLI_LINE = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(?:\.venv/bin/)?twotower\s")


def _readme_cli_lines() -> list[list[str]]:
    """Every `twotower ...` command line in the README's code blocks (leading VAR=value dropped)."""
    commands = []
    for line in markdown_code_lines(README):
        line = line.split(" #", 1)[0].strip()
        if not _CLI_LINE.match(line):
            continue
        words = shlex.split(line)
        while not words[0].endswith("twotower"):
            words.pop(0)
        commands.append(words[1:])
    assert commands, "no twotower command lines found in the README"
    return commands


@pytest.mark.parametrize("argv", _readme_cli_lines(), ids=lambda a: " ".join(a)[:60])
def test_readme_command_lines_are_real(argv: list[str]) -> None:
    assert_valid_cli(argv, "README.md")


def test_readme_links_point_at_files_in_the_repo() -> None:
    targets = re.findall(r"\]\(([^)#:]+)\)", README)
    assert targets
    missing = [t for t in targets if not (REPO_ROOT / t).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"
