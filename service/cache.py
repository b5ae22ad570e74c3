"""Two-level result cache with single-flight misses.

Level 2 (shared): Redis, key ``<prefix>:v1:rec:[{<user>}:]<index_version>:<sha256 of the canonical
request>`` (see ``cache_key``), with a TTL. The index version is part of the key, so a new bundle makes every old entry
unreachable. The canonical request covers the user id, inline history and features, k and the
filters; what the user did through events is covered by the user's event counter, stored with the
entry and compared in the same round trip (see ``service.events``).

Level 1 (this process): a small LRU of the same entries with a short TTL. On this 2-core machine a
Redis round trip costs several times the CPU of the whole HTTP request (the loopback send and the
wake-up of redis-server), so hot keys are answered from memory. Level-1 entries of a user are
dropped when an event for that user is recorded: in this process at once (before the event's
response is sent), from other processes through the ``<prefix>:v1:events`` notice channel (sub-ms on
one host). While that channel is not connected, level 1 is not used for requests that name a user.
Set ``TT_LOCAL_CACHE_TTL_S=0`` when several processes serve and a recall sent within a millisecond
of an event posted to *another* process must already reflect it.

A Redis error never fails a request: the answer is computed and not cached ("bypass"), and while
Redis is down level 1 is skipped too, so every answer says ``cached: false``.

Identical concurrent misses (same key, same event counter) in this process share one computation:
the first caller starts it as a task, later callers await the same task.

A fresh answer is written to Redis behind the response (the request does not wait for the SET);
until the write lands, the finished computation stays registered, so an identical request in that
window is answered from it (``cached: true``) rather than computed again.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from service.metrics import Metrics
from service.redisconn import RedisCoalescer, RedisGuard, RedisUnavailable


@dataclass
class Computed:
    body: bytes  # the JSON answer without the "cached" field (see service.pipeline.render)
    seq: int | None  # event counter the answer was computed at (None: no events involved)
    cacheable: bool = True  # False when part of the input could not be read (Redis failed mid-way)


@dataclass
class Lookup:
    body: bytes | None
    seq: int | None  # the user's current event counter, when it was read


def cache_key(prefix: str, index_version: str, canonical: bytes, user: str | None = None) -> str:
    """The answer's key. An answer that depends on a user's events carries the user as a hash tag
    (``{user}``), as the user's event keys do under Redis Cluster: the lookup reads the answer and the
    user's event counter in one MGET, and a cluster serves that only when both keys share a slot."""
    digest = hashlib.sha256(canonical).hexdigest()
    if user is None:
        return f"{prefix}:v1:rec:{index_version}:{digest}"
    return f"{prefix}:v1:rec:{{{user}}}:{index_version}:{digest}"


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


class LocalCache:
    """LRU bounded by bytes, entries expire after ``ttl_s``; remembers which keys belong to a user."""

    def __init__(self, ttl_s: float, max_bytes: int) -> None:
        self.ttl_s, self.max_bytes = ttl_s, max_bytes
        self._d: OrderedDict[str, tuple[float, int | None, bytes, str | None]] = OrderedDict()
        self._by_user: dict[str, set[str]] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: str) -> tuple[int | None, bytes] | None:
        ent = self._d.get(key)
        if ent is None:
            return None
        if ent[0] < time.monotonic():
            self._drop(key)
            return None
        self._d.move_to_end(key)
        return ent[1], ent[2]

    def put(self, key: str, seq: int | None, body: bytes, user: str | None) -> None:
        if key in self._d:
            self._drop(key)
        size = len(body) + len(key) + 100
        if size > self.max_bytes:
            return
        now = time.monotonic()
        # Expired entries at the cold end go first. Without this, answers nobody asks for again
        # (new users, one-off histories) stay until the byte cap pushes them out, and resident
        # memory climbs steadily to the cap (seen in benchmarks/soak.py: +2 MiB/min).
        while self._d:
            oldest = next(iter(self._d))
            if self._d[oldest][0] >= now:
                break
            self._drop(oldest)
        self._d[key] = (now + self.ttl_s, seq, body, user)
        self.bytes += size
        if user is not None:
            self._by_user.setdefault(user, set()).add(key)
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._d)))

    def _drop(self, key: str) -> None:
        ent = self._d.pop(key, None)
        if ent is None:
            return
        self.bytes -= len(ent[2]) + len(key) + 100
        user = ent[3]
        if user is not None:
            keys = self._by_user.get(user)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_user[user]

    def drop_user(self, user: str) -> None:
        for key in list(self._by_user.pop(user, ())):
            ent = self._d.pop(key, None)
            if ent is not None:
                self.bytes -= len(ent[2]) + len(key) + 100

    def drop_users(self) -> None:
        for user in list(self._by_user):
            self.drop_user(user)

    def clear(self) -> None:
        self._d.clear()
        self._by_user.clear()
        self.bytes = 0


class _LeaderGone(Exception):
    """The request computing a shared answer was cancelled before it had one."""


class ResultCache:
    """``mode``: "redis" (L2 in Redis, optional L1), "memory" (no Redis configured: L1 is the cache,
    with the full TTL) or "off" (TTL 0)."""

    _RECENT = 4096  # event notices remembered, to refuse L1 writes computed before one of them

    def __init__(self, *, guard: RedisGuard | None, prefix: str, ttl_s: int, metrics: Metrics,
                 local_ttl_s: float = 10.0, local_max_bytes: int = 64 << 20,
                 redis: RedisCoalescer | None = None) -> None:
        self.guard = guard if guard is not None and guard.configured else None
        self.prefix, self.ttl_s, self.metrics = prefix, ttl_s, metrics
        self.mode = "off" if ttl_s <= 0 else ("redis" if self.guard is not None else "memory")
        local_ttl = ttl_s if self.mode == "memory" else min(float(local_ttl_s), float(ttl_s))
        self.local: LocalCache | None = LocalCache(local_ttl, local_max_bytes) \
            if self.mode != "off" and local_ttl > 0 else None
        # In "redis" mode, L1 may answer for a named user only while event notices from other
        # processes are flowing; the runtime flips this when its subscription (dis)connects.
        self.user_notices_live = self.mode == "memory"
        self._notices = 0
        self._recent: deque[tuple[int, str]] = deque(maxlen=self._RECENT)
        self._inflight: dict[str, asyncio.Future[Computed]] = {}
        self._writes: set[asyncio.Future[Any]] = set()  # Redis writes queued by _store_behind
        self._redis = (redis or RedisCoalescer(self.guard)) if self.guard is not None else None
        c = metrics.cache
        self._hit, self._hit_local = c.labels(result="hit"), c.labels(result="hit_local")
        self._miss, self._shared, self._bypass = (c.labels(result="miss"), c.labels(result="shared"),
                                                  c.labels(result="bypass"))

    def key(self, index_version: str, canonical: bytes, user: str | None = None) -> str:
        return cache_key(self.prefix, index_version, canonical, user)

    # ------------------------------------------------------------------ event notices
    def user_changed(self, user: str) -> None:
        """An event for ``user`` was recorded (here or in another process): forget their L1 answers."""
        self._notices += 1
        self._recent.append((self._notices, user))
        if self.local is not None:
            self.local.drop_user(user)

    def notices_connected(self, live: bool) -> None:
        """The cross-process notice feed went up or down. Either way, notices may have been missed."""
        if self.mode == "redis":
            self.user_notices_live = live
            if self.local is not None:
                self.local.drop_users()
            self._notices += 1  # in-flight computations must not fill L1 with what they read before

    def _changed_since(self, user: str, mark: int) -> bool:
        if self._notices == mark:
            return False
        if not self._recent or self._recent[0][0] > mark + 1:
            return True  # the ring no longer reaches back to mark: assume the worst
        return any(n > mark and u == user for n, u in self._recent)

    def _local_ok(self, user: str | None) -> bool:
        if self.local is None:
            return False
        if self.mode == "redis" and self.guard is not None and not self.guard.up:
            return False  # Redis down: answers are uncached, also from L1
        return user is None or self.user_notices_live

    # ------------------------------------------------------------------ level 2
    async def lookup(self, key: str, seq_key: str | None, local_seq: int | None) -> Lookup | None:
        """None when the shared cache cannot be used (off, or Redis unavailable)."""
        if self.mode == "off":
            return None
        if self.mode == "memory":
            return Lookup(None, local_seq)
        assert self._redis is not None
        try:
            if seq_key is None:
                raw = (await self._redis.mget(key))[0]
                seq = None
            else:
                # the entry and the user's event counter in one read
                raw, rseq = await self._redis.mget(key, seq_key)
                seq = int(rseq or 0)
        except RedisUnavailable:
            return None
        if raw is None:
            return Lookup(None, seq)
        got = _unpack(raw)
        if got is None or got[0] != seq:
            return Lookup(None, seq)
        return Lookup(got[1], seq)

    # ------------------------------------------------------------------ the read-through path
    async def get_or_compute(self, key: str, user: str | None, seq_key: str | None, local_seq: int | None,
                             compute: Callable[[], Awaitable[Computed]],
                             on_wait: Callable[[], None] | None = None) -> tuple[bytes, bool]:
        """(body, served_from_cache). ``user``: the user the answer depends on through events.
        ``on_wait`` is called when this caller will not compute but wait for another's computation."""
        mark = self._notices
        if self._local_ok(user):
            assert self.local is not None
            ent = self.local.get(key)
            if ent is not None and (self.mode != "memory" or user is None or ent[0] == local_seq):
                self._hit_local.inc()
                return ent[1], True
        look = await self.lookup(key, seq_key, local_seq)
        if look is not None and look.body is not None:
            self._hit.inc()
            self._fill_local(key, look.seq, look.body, user, mark)
            return look.body, True
        usable = look is not None
        flight = f"{key}#{look.seq if look is not None else '?'}"
        fut = self._inflight.get(flight)
        if fut is not None:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # computed before this request came, its cache write still on its way to Redis:
                # this answer is served from the cache, just not from Redis yet
                self._hit.inc()
                return fut.result().body, True
            self._shared.inc()
            if on_wait is not None:
                on_wait()
            try:
                # shield: this caller's cancellation must not cancel the computation others wait on
                return (await asyncio.shield(fut)).body, False
            except _LeaderGone:  # the computing request was cancelled: compute it ourselves
                return await self.get_or_compute(key, user, seq_key, local_seq, compute, on_wait)
        (self._miss if usable else self._bypass).inc()
        # This request computes, in its own task (no task of its own for the computation: one
        # scheduling step less per miss); identical requests meanwhile wait on ``shared``.
        shared: asyncio.Future[Computed] = asyncio.get_running_loop().create_future()
        self._inflight[flight] = shared
        try:
            res = await compute()
        except BaseException as exc:
            self._inflight.pop(flight, None)
            shared.set_exception(_LeaderGone() if isinstance(exc, asyncio.CancelledError) else exc)
            shared.exception()  # marked retrieved: with no one waiting, asyncio must not log it
            raise
        written_later = False
        if usable and res.cacheable:
            self._fill_local(key, res.seq, res.body, user, mark)
            written_later = self._store_behind(key, flight, res)
        if not written_later:
            self._inflight.pop(flight, None)
        shared.set_result(res)
        return res.body, False

    def _fill_local(self, key: str, seq: int | None, body: bytes, user: str | None, mark: int) -> None:
        if not self._local_ok(user):
            return
        if user is not None and self._changed_since(user, mark):
            return  # an event for this user arrived while we were reading: the answer may be stale
        assert self.local is not None
        self.local.put(key, seq, body, user)

    def _store_behind(self, key: str, flight: str, res: Computed) -> bool:
        """Queue the Redis write of a fresh answer without making its request wait for it (on the
        uncached path that round trip was a fifth of a request's wall time). The flight stays
        registered until the write has landed, so an identical request meanwhile reuses the answer
        instead of missing in Redis and computing it again. True when a write was queued."""
        if self.mode != "redis":
            return False
        assert self._redis is not None
        fut = self._redis.set(key, _pack(res.seq, res.body), self.ttl_s)
        self._writes.add(fut)

        def landed(f: asyncio.Future[Any]) -> None:
            self._writes.discard(f)
            self._inflight.pop(flight, None)
            if not f.cancelled():
                f.exception()  # a failed write is a cache miss later, nothing more (the breaker logs it)

        fut.add_done_callback(landed)
        return True

    async def drain(self, timeout_s: float = 2.0) -> None:
        """Wait (bounded) for cache writes still on their way to Redis: called at shutdown."""
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=timeout_s)
