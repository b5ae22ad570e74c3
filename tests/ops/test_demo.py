"""`twotower demo` (what `make demo` runs): the whole pipeline once, and it cleans up after itself."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from twotower.demo import DemoConfig, _redis_for_demo, run


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.mark.slow
def test_demo_trains_indexes_serves_and_answers(tmp_path: Path, redis_url: str, redis_prefix: str,
                                                free_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    import redis

    cfg = DemoConfig(artifacts=tmp_path / "artifacts", n_users=200, n_items=120, epochs=1, k=5,
                     redis_url=redis_url, redis_prefix=redis_prefix, port=free_port)
    answers = run(cfg)
    out = capsys.readouterr().out

    # a model and a published bundle are left for `twotower serve`
    assert (cfg.artifacts / "models" / answers["model_version"] / "model.pt").is_file()
    assert (cfg.artifacts / "bundles" / "CURRENT").is_file()
    assert answers["index_version"] in (cfg.artifacts / "bundles" / "CURRENT").read_text()

    # the known user gets k unseen items from that model and index; the repeat comes from the cache
    known = answers["known"]
    assert len(known["items"]) == 5 and known["cached"] is False
    assert known["model_version"] == answers["model_version"]
    assert known["index_version"] == answers["index_version"]
    assert answers["known_again"]["cached"] is True
    assert answers["known_again"]["items"] == known["items"]
    # a user the model never saw still gets a personalised (not fallback) answer from the history
    assert len(answers["newcomer"]["items"]) == 5 and not answers["newcomer"].get("fallback")

    # printed for a person, then everything it started is stopped and its keys are gone
    assert f"POST http://127.0.0.1:{free_port}/v1/recall" in out and "cached=true" in out
    assert "stopped the API" in out
    assert not _listening(free_port), "the demo left the API running"
    client = redis.Redis.from_url(redis_url)
    assert list(client.scan_iter(match=f"{redis_prefix}:*")) == []
    client.close()


def test_demo_starts_a_redis_when_none_answers_and_stops_it(free_port: int,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed; `make test` needs it (apt-get install redis-server)")
    cfg = DemoConfig(redis_url=f"redis://127.0.0.1:{free_port}/0")
    with _redis_for_demo(cfg) as url:
        import redis

        assert url.startswith("redis://127.0.0.1:")
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert redis.Redis.from_url(url).ping()
    assert not _listening(port), "the demo left its redis-server running"
    assert "started redis-server" in capsys.readouterr().out


def test_demo_falls_back_to_the_in_process_cache_without_redis_server(
        free_port: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server to be found
    cfg = DemoConfig(redis_url=f"redis://127.0.0.1:{free_port}/0")
    with _redis_for_demo(cfg) as url:
        assert url == ""  # the API's "no Redis" setting
    out = capsys.readouterr().out
    assert "redis-server is not installed" in out and "in-process cache" in out
