"""Result cache (Redis, or in-process when no Redis is configured) with single-flight misses.

Key: ``<prefix>:v1:rec:<index_version>:<sha256 of the canonical request>``. The index version is
part of the key, so a new bundle makes every old entry unreachable (they expire by TTL). The
canonical request covers the user id, inline history and features, k and the filters; what the
user did through events is covered by the user's event counter, stored with the entry and compared
in the same round trip (see ``service.events``). A Redis error never fails a request: the lookup
counts as a bypass and the answer is computed, uncached.

Identical concurrent misses (same key, same event counter) in this process share one
computation: the first caller starts it as a task, later callers await the same task.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from service.metrics import Metrics
from service.redisconn import RedisGuard, RedisUnavailable


@dataclass
class Computed:
    body: bytes  # the JSON answer without the "cached" field (see service.pipeline.render)
    seq: int | None  # event counter the answer was computed at (None: no events involved)
    cacheable: bool = True  # False when part of the input could not be read (Redis failed mid-way)


@dataclass
class Lookup:
    body: bytes | None
    seq: int | None  # the user's current event counter, when it was read


def cache_key(prefix: str, index_version: str, canonical: bytes) -> str:
    return f"{prefix}:v1:rec:{index_version}:{hashlib.sha256(canonical).hexdigest()}"


def _pack(seq: int | None, body: bytes) -> bytes:
    return (b"-" if seq is None else str(seq).encode()) + b"\n" + body


def _unpack(raw: bytes) -> tuple[int | None, bytes] | None:
    head, sep, body = raw.partition(b"\n")
    if not sep:
        return None
    try:
        return (None if head == b"-" else int(head)), body
    except ValueError:
        return None


class ResultCache:
    def __init__(self, *, guard: RedisGuard | None, prefix: str, ttl_s: int, metrics: Metrics,
                 local_max_entries: int = 50_000) -> None:
        self.guard = guard if guard is not None and guard.configured else None
        self.prefix, self.ttl_s, self.metrics = prefix, ttl_s, metrics
        self.mode = "off" if ttl_s <= 0 else ("redis" if self.guard is not None else "memory")
        self._local: OrderedDict[str, tuple[float, int | None, bytes]] = OrderedDict()
        self._local_max = local_max_entries
        self._inflight: dict[str, asyncio.Future[Computed]] = {}
        c = metrics.cache
        self._hit, self._miss = c.labels(result="hit"), c.labels(result="miss")
        self._shared, self._bypass = c.labels(result="shared"), c.labels(result="bypass")

    def key(self, index_version: str, canonical: bytes) -> str:
        return cache_key(self.prefix, index_version, canonical)

    # ------------------------------------------------------------------ raw get / set
    async def lookup(self, key: str, seq_key: str | None, local_seq: int | None) -> Lookup | None:
        """None when the cache cannot be used (off, or Redis unavailable)."""
        if self.mode == "off":
            return None
        if self.mode == "memory":
            ent = self._local.get(key)
            if ent is None or ent[0] < time.monotonic():
                return Lookup(None, local_seq)
            self._local.move_to_end(key)
            return Lookup(ent[2] if ent[1] == local_seq else None, local_seq)
        assert self.guard is not None

        async def op(r) -> Lookup:
            if seq_key is None:
                raw = await r.get(key)
                seq = None
            else:
                # one round trip for the entry and the user's event counter
                async with r.pipeline(transaction=False) as p:
                    p.get(key)
                    p.get(seq_key)
                    raw, rseq = await p.execute()
                seq = int(rseq or 0)
            if raw is None:
                return Lookup(None, seq)
            got = _unpack(raw)
            if got is None or got[0] != seq:
                return Lookup(None, seq)
            return Lookup(got[1], seq)

        try:
            return await self.guard.run(op)
        except RedisUnavailable:
            return None

    async def store(self, key: str, seq: int | None, body: bytes) -> None:
        if self.mode == "off":
            return
        if self.mode == "memory":
            self._local[key] = (time.monotonic() + self.ttl_s, seq, body)
            self._local.move_to_end(key)
            while len(self._local) > self._local_max:
                self._local.popitem(last=False)
            return
        assert self.guard is not None
        try:
            await self.guard.run(lambda r: r.set(key, _pack(seq, body), ex=self.ttl_s))
        except RedisUnavailable:
            pass

    # ------------------------------------------------------------------ the read-through path
    async def get_or_compute(self, key: str, seq_key: str | None, local_seq: int | None,
                             compute: Callable[[], Awaitable[Computed]]) -> tuple[bytes, bool]:
        """(body, served_from_cache)."""
        look = await self.lookup(key, seq_key, local_seq)
        if look is not None and look.body is not None:
            self._hit.inc()
            return look.body, True
        usable = look is not None
        flight = f"{key}#{look.seq if look is not None else '?'}"
        fut = self._inflight.get(flight)
        if fut is not None:
            self._shared.inc()
            return (await asyncio.shield(fut)).body, False
        (self._miss if usable else self._bypass).inc()
        task = asyncio.ensure_future(self._compute_and_store(key, flight, compute, usable))
        self._inflight[flight] = task
        # shield: a client that disconnects must not cancel the computation others are waiting on
        return (await asyncio.shield(task)).body, False

    async def _compute_and_store(self, key: str, flight: str, compute: Callable[[], Awaitable[Computed]],
                                 usable: bool) -> Computed:
        try:
            res = await compute()
            if usable and res.cacheable:
                await self.store(key, res.seq, res.body)
            return res
        finally:
            self._inflight.pop(flight, None)
