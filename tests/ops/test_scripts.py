"""The helper scripts behind `make test` / `make demo`, run for real."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

from tests.ops._tools import REPO_ROOT, run

WITH_REDIS = str(REPO_ROOT / "scripts" / "with-redis.sh")
BASH = shutil.which("bash") or "/bin/bash"
PING = [sys.executable, "-c",
        "import os, redis; redis.Redis.from_url(os.environ['TT_REDIS_URL'], socket_timeout=2).ping(); print('PONG')"]


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def test_with_redis_uses_a_running_redis_and_returns_the_commands_status(redis_url: str) -> None:
    result = run([WITH_REDIS, *PING[:2], PING[2] + "; raise SystemExit(7)"], env={"TT_REDIS_URL": redis_url})
    assert result.returncode == 7, result.stderr
    assert "PONG" in result.stdout and "using the Redis that answers" in result.stdout


def test_with_redis_starts_a_server_when_none_answers_and_stops_it_afterwards(free_port: int) -> None:
    assert not _answers(free_port)
    url = f"redis://127.0.0.1:{free_port}/0"
    result = run([WITH_REDIS, *PING[:2], PING[2] + "; raise SystemExit(3)"], env={"TT_REDIS_URL": url})
    assert result.returncode == 3, result.stdout + result.stderr  # the command's status, not the script's
    assert "PONG" in result.stdout, "the command could not reach the Redis the script started"
    assert f"started redis-server on 127.0.0.1:{free_port}" in result.stdout
    assert not _answers(free_port), "the redis-server the script started is still running"


def test_with_redis_fails_loudly_without_redis_or_redis_server(tmp_path: Path, free_port: int) -> None:
    # a PATH with the few tools the script uses, but no redis-server
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("mktemp", "rm", "seq", "sleep", "cat"):
        found = shutil.which(name)
        assert found
        os.symlink(found, bindir / name)
    marker = tmp_path / "ran"
    result = run([BASH, WITH_REDIS, shutil.which("touch") or "/usr/bin/touch", str(marker)],
                 env={"PATH": str(bindir), "TT_REDIS_URL": f"redis://127.0.0.1:{free_port}/0"})
    assert result.returncode == 1
    assert "redis-server is not installed" in result.stderr
    assert not marker.exists(), "the command must not run without a Redis"


def test_install_torch_keeps_an_installed_cpu_torch() -> None:
    result = run([str(REPO_ROOT / "scripts" / "install-torch.sh"), sys.executable], timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch 2.13.0 (CPU) is already installed" in result.stdout


def test_quality_benchmark_refuses_a_partial_run_that_would_overwrite_a_report_whose_store_is_gone(
        tmp_path: Path) -> None:
    report = tmp_path / "quality.md"
    report.write_text("# every row of an earlier run\n")
    store = tmp_path / "quality.json"
    result = run([sys.executable, str(REPO_ROOT / "benchmarks" / "quality.py"), "--only", "ours",
                  "--store", str(store), "--out", str(report)])
    assert result.returncode == 2, result.stdout + result.stderr
    assert str(store) in result.stderr and "--only" in result.stderr
    assert report.read_text() == "# every row of an earlier run\n" and not store.exists()
