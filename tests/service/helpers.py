"""Running the app in-process for tests: lifespan + httpx over ASGI, no sockets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from service.app import create_app
from service.settings import Settings


def settings_for(artifacts: Path, redis_url: str, prefix: str, **kw: Any) -> Settings:
    base: dict[str, Any] = dict(artifacts=artifacts, redis_url=redis_url, redis_prefix=prefix, reload_poll_s=0,
                                access_log=False, microbatch_max_wait_ms=1)
    base.update(kw)
    return Settings(**base)


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


async def eventually(check: Callable[[], Any], timeout: float = 10.0, every: float = 0.05) -> Any:
    """Await ``check()`` until it returns a truthy value (it may be async)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")
