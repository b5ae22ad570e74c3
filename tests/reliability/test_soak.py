"""A short soak in the suite (the 60 s one is `python benchmarks/soak.py --seconds 60 --concurrency 32`):
10 s at concurrency 32 with every kind of request, no errors, resident memory growth under 10%."""

from __future__ import annotations

import importlib.util
from types import ModuleType

import pytest

from tests.reliability.harness import REPO_ROOT, ServerProc

pytestmark = pytest.mark.slow


def _soak_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tt_benchmarks_soak", REPO_ROOT / "benchmarks" / "soak.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ten_second_soak_at_concurrency_32_has_no_errors_and_flat_memory(shared_server: ServerProc,
                                                                         record_property) -> None:
    res = _soak_module().soak(shared_server.url, shared_server.pid, seconds=10, concurrency=32, warmup=3)
    record_property("soak", res)
    print("soak:", res)
    assert res["requests"] >= 200, res
    assert res["errors"] == {} and res["warmup_errors"] == {}, res
    assert res["rss_growth_pct"] < 10.0, res
