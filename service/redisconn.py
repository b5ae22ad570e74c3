"""Redis behind a circuit breaker: a dead or hung Redis costs one short timeout, not one per request.

The service treats Redis as an accelerator (cache) and a store of recent events, never as a
dependency of answering: when a call fails the breaker opens and, for ``retry_s`` (doubling up to
``retry_max_s`` while failures continue), every caller gets ``RedisUnavailable`` at once without
touching the network. After that one caller probes; success closes the breaker. A background
``watch`` loop also probes (every second), so readiness follows Redis without traffic.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

log = logging.getLogger(__name__)
T = TypeVar("T")


class RedisUnavailable(RuntimeError):
    """Redis is not configured, or failed recently and the breaker is open."""


Client = aioredis.Redis | RedisCluster


def make_client(url: str, timeout_s: float, cluster: bool = False) -> Client:
    """redis-py's asyncio client for one node, or its cluster client (``cluster``: ``url`` names any
    node; the others are discovered from it, and each command goes to the node owning its keys).

    No retries inside redis-py: the breaker decides when to try again, and a retry loop with
    backoff would put seconds of latency on the request that happens to hit a dead Redis (the
    cluster client still follows MOVED/ASK redirections and refreshes its slot map).
    No CLIENT SETINFO on each new connection: one more round trip, and redis-py looks its own
    version up in the package metadata (~20 ms) every time. redis-py >= 7 spells it driver_info."""
    kw: dict[str, Any] = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0))
    factory: Any = RedisCluster.from_url if cluster else aioredis.Redis.from_url
    if not cluster:
        kw["health_check_interval"] = 0
    try:
        return factory(url, driver_info=None, **kw)
    except TypeError:
        return factory(url, lib_name=None, lib_version=None, **kw)


class RedisGuard:
    def __init__(self, client: Client | None, *, retry_s: float = 0.5, retry_max_s: float = 5.0,
                 on_change: Callable[[bool], None] | None = None) -> None:
        self.client = client
        self.retry_s = retry_s
        self.retry_max_s = retry_max_s
        self._open_until = 0.0
        self._backoff = retry_s
        self._probing = False
        self._up = client is not None
        self._on_change = on_change
        self.last_error: str | None = None

    @property
    def configured(self) -> bool:
        return self.client is not None

    @property
    def up(self) -> bool:
        return self.client is not None and self._up

    def _available(self) -> bool:
        if self.client is None:
            return False
        if self._up:
            return True
        # breaker open: only one caller at a time probes, and only after the backoff has passed
        if self._probing or time.monotonic() < self._open_until:
            return False
        return True

    def _set_up(self, up: bool) -> None:
        if up != self._up:
            self._up = up
            log.warning("redis is %s", "back" if up else "unavailable", extra={"redis_error": self.last_error})
            if self._on_change is not None:
                self._on_change(up)

    def _failed(self, exc: BaseException) -> None:
        self.last_error = f"{exc.__class__.__name__}: {exc}"
        now = time.monotonic()
        if self._up:
            self._backoff = self.retry_s
        else:
            self._backoff = min(self.retry_max_s, self._backoff * 2)
        self._open_until = now + self._backoff
        self._set_up(False)

    def _succeeded(self) -> None:
        self._backoff = self.retry_s
        self.last_error = None
        self._set_up(True)

    async def run(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``fn(client)``; raise RedisUnavailable (never a redis error) when Redis cannot be used."""
        if not self._available():
            raise RedisUnavailable(self.last_error or "redis is not configured")
        probe = not self._up
        if probe:
            self._probing = True
        assert self.client is not None
        try:
            result = await fn(self.client)
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed(exc)
            raise RedisUnavailable(self.last_error or "redis failed") from exc
        finally:
            if probe:
                self._probing = False
        self._succeeded()
        return result

    async def ping(self) -> bool:
        try:
            await self.run(lambda c: c.ping())
            return True
        except RedisUnavailable:
            return False

    async def watch(self, interval_s: float = 1.0) -> None:
        """Probe every ``interval_s``: recovery is noticed without traffic, and so is a failure while
        every request is answered from the in-process cache (which never touches Redis)."""
        while True:
            await asyncio.sleep(interval_s)
            if self.client is not None and not self._probing and (self._up or time.monotonic() >= self._open_until):
                await self.ping()

    async def close(self) -> None:
        if self.client is not None:
            try:
                await self.client.aclose()
            except Exception:  # closing a broken connection may itself fail; nothing to do then
                pass


class RedisCoalescer:
    """Gathers the Redis commands of the request path issued in the same event-loop turn into one
    round trip.

    Under concurrency, requests reach Redis in bursts (a micro-batch finishes, its clients send their
    next requests together). One round trip for the burst instead of one per request: on loopback
    the round trip's syscalls and wake-ups cost more CPU than the commands themselves. Each caller
    gets its own future; commands reach Redis in the order they were issued. A command that needs
    several keys read or written together (a user's events) is one EVAL of a script, atomic on its
    own, so no MULTI block has to be kept apart from the other commands of the batch.

    Transport: a redis-py pipeline (not a transaction) of the guard's client; with the cluster
    client, redis-py splits it by node and each command goes to the node that owns its keys (the
    keys of one command share a slot through hash tags, see service.cache and service.events).
    """

    def __init__(self, guard: RedisGuard) -> None:
        self.guard = guard
        self._ops: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._scheduled = False

    def command(self, *args: Any) -> asyncio.Future[Any]:
        """Any single command, e.g. ``command("EVAL", script, 2, k1, k2, arg)``: resolves to its reply."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._ops.append((args, fut))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return fut

    def mget(self, *keys: str) -> asyncio.Future[list[bytes | None]]:
        return self.command("MGET", *keys)

    def set(self, key: str, value: bytes, ttl_s: int) -> asyncio.Future[Any]:
        return self.command("SET", key, value, "EX", int(ttl_s))

    def _flush(self) -> None:
        self._scheduled = False
        ops, self._ops = self._ops, []
        if ops:
            task = asyncio.get_running_loop().create_task(self._run(ops))
            task.add_done_callback(_ignore_result)

    async def _run(self, ops: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        async def pipelined(r: Any) -> list[Any]:
            async with r.pipeline(transaction=False) as p:
                for c, _ in ops:
                    p.execute_command(*c)
                return list(await p.execute())

        try:
            replies = await self.guard.run(pipelined)
        except BaseException as exc:  # RedisUnavailable, or cancellation at shutdown
            err = exc if isinstance(exc, RedisUnavailable) else RedisUnavailable(str(exc) or "cancelled")
            for _, fut in ops:
                if not fut.done():
                    fut.set_exception(err)
            if not isinstance(exc, RedisUnavailable):
                raise
            return
        for (_, fut), res in zip(ops, replies, strict=True):
            if not fut.done():
                fut.set_result(res)

def _ignore_result(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: the callers already got it through their futures
