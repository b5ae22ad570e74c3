"""Per-user event history: what a user did since the bundle was built.

Redis layout (all under ``<prefix>:v1:``; under Redis Cluster the user id is a hash tag, ``{<user_id>}``,
so a user's three keys and cached answers share one slot):
- ``events:<user_id>``  list, oldest first, capped at ``events_cap`` entries ("<timestamp> <item>")
  -> feeds the user tower (its last ``history_len`` entries)
- ``seen:<user_id>``    set of every item the user touched through events (not capped, so
  ``exclude_seen`` keeps excluding items that fell out of the capped list)
- ``evseq:<user_id>``   counter bumped by every event; the result cache stores the counter it was
  computed at and a lookup compares it in the same round trip, so the next recall after an event
  never serves a stale answer (cheaper than deleting the user's cache keys, which we cannot list).
All three are written by one script (``_APPEND``, atomic), followed in the same round trip by a
PUBLISH of the user id on ``<prefix>:v1:events`` so other processes drop their in-memory answers for
that user, and share a TTL refreshed on each event. They are read by one script too (``_READ``), a
consistent snapshot of the three.

When Redis is configured but down, ``append`` raises ``RedisUnavailable`` and the route answers 503:
an event is never dropped silently. With no Redis configured (``TT_REDIS_URL=""``) events live in
this process (``MemoryEventStore``), which is only correct with a single worker.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from service.redisconn import RedisCoalescer, RedisGuard, RedisUnavailable

__all__ = ["UserEvents", "EventStore", "RedisEventStore", "MemoryEventStore", "RedisUnavailable"]


@dataclass
class UserEvents:
    items: list[str] = field(default_factory=list)  # item tokens (str(item_id)), oldest first
    seen: set[str] = field(default_factory=set)
    seq: int = 0


def events_channel(prefix: str) -> str:
    return f"{prefix}:v1:events"


def _entry(ts: int, token: str) -> str:
    return f"{ts} {token}"


def _parse_entries(raw: list[bytes] | list[str]) -> list[str]:
    """Entries in timestamp order (stable for ties): a late event with an old timestamp lands where
    it happened, not at the end."""
    parsed: list[tuple[int, int, str]] = []
    for i, e in enumerate(raw):
        s = e.decode() if isinstance(e, bytes) else str(e)
        ts, _, tok = s.partition(" ")
        try:
            parsed.append((int(ts), i, tok))
        except ValueError:
            continue
    parsed.sort()
    return [tok for _, _, tok in parsed]


class EventStore:
    backend = "none"

    def seq_key(self, user_id: str) -> str | None:
        """Redis key of the user's event counter (None when events are not in Redis)."""
        return None

    def local_seq(self, user_id: str) -> int:
        return 0

    async def append(self, user_id: str, token: str, ts: int | None = None) -> tuple[int, int]:
        """Record one event; returns (events kept for the user, new sequence number)."""
        raise NotImplementedError

    async def read(self, user_id: str) -> UserEvents:
        raise NotImplementedError


# KEYS: events list, seen set, counter. ARGV: entry, item token, cap, ttl (0 = none).
# Returns [events kept, new counter].
_APPEND = """
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
redis.call('SADD', KEYS[2], ARGV[2])
local seq = redis.call('INCR', KEYS[3])
local n = redis.call('LLEN', KEYS[1])
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ttl) end
end
return {n, seq}
"""
# KEYS: events list, seen set, counter. Returns [entries, seen items, counter or nil].
_READ = """
return {redis.call('LRANGE', KEYS[1], 0, -1), redis.call('SMEMBERS', KEYS[2]), redis.call('GET', KEYS[3])}
"""


class RedisEventStore(EventStore):
    backend = "redis"

    def __init__(self, guard: RedisGuard, prefix: str, cap: int, ttl_s: int,
                 redis: RedisCoalescer | None = None, hash_tags: bool = False) -> None:
        self.guard, self.prefix, self.cap, self.ttl_s = guard, prefix, cap, ttl_s
        # Redis Cluster: a user's keys (and cached answers, see service.cache.cache_key) carry the user
        # as a hash tag, so the scripts and the cache lookup touch one slot. One node keeps the plain
        # names, so histories recorded before keep being read.
        self.hash_tags = hash_tags
        self.notice_channel = events_channel(prefix)
        # reads (on every uncached recall of a known user) and writes go through the request path's
        # coalescer: one round trip per event-loop turn
        self._redis = redis if redis is not None else RedisCoalescer(guard)

    def _k(self, kind: str, user_id: str) -> str:
        if self.hash_tags:
            return f"{self.prefix}:v1:{kind}:{{{user_id}}}"
        return f"{self.prefix}:v1:{kind}:{user_id}"

    def _keys(self, user_id: str) -> tuple[str, str, str]:
        return self._k("events", user_id), self._k("seen", user_id), self._k("evseq", user_id)

    def seq_key(self, user_id: str) -> str | None:
        return self._k("evseq", user_id)

    async def append(self, user_id: str, token: str, ts: int | None = None) -> tuple[int, int]:
        ts = int(time.time()) if ts is None else int(ts)
        wrote = self._redis.command("EVAL", _APPEND, 3, *self._keys(user_id), _entry(ts, token), token,
                                    self.cap, self.ttl_s)
        published = self._redis.command("PUBLISH", self.notice_channel, user_id)
        # a failed PUBLISH alone does not fail the event: it is stored, and other processes' in-memory
        # answers for the user expire by TT_LOCAL_CACHE_TTL_S
        outcome: tuple[Any, Any] = await asyncio.gather(wrote, published, return_exceptions=True)
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        n, seq = outcome[0]
        return int(n), int(seq)

    async def read(self, user_id: str) -> UserEvents:
        lst, seen, seq = await self._redis.command("EVAL", _READ, 3, *self._keys(user_id))
        return UserEvents(items=_parse_entries(lst), seen={s.decode() if isinstance(s, bytes) else s for s in seen},
                          seq=int(seq or 0))


class MemoryEventStore(EventStore):
    """Single-process stand-in used when no Redis is configured (bounded to ``max_users`` users)."""

    backend = "memory"

    def __init__(self, cap: int, max_users: int = 100_000) -> None:
        self.cap, self.max_users = cap, max_users
        self._users: OrderedDict[str, tuple[deque[tuple[int, str]], set[str], list[int]]] = OrderedDict()

    def local_seq(self, user_id: str) -> int:
        u = self._users.get(user_id)
        return u[2][0] if u else 0

    async def append(self, user_id: str, token: str, ts: int | None = None) -> tuple[int, int]:
        ts = int(time.time()) if ts is None else int(ts)
        u = self._users.get(user_id)
        if u is None:
            u = (deque(maxlen=self.cap), set(), [0])
            self._users[user_id] = u
            while len(self._users) > self.max_users:
                self._users.popitem(last=False)
        self._users.move_to_end(user_id)
        u[0].append((ts, token))
        u[1].add(token)
        u[2][0] += 1
        return len(u[0]), u[2][0]

    async def read(self, user_id: str) -> UserEvents:
        u = self._users.get(user_id)
        if u is None:
            return UserEvents()
        return UserEvents(items=_parse_entries([_entry(ts, t) for ts, t in u[0]]), seen=set(u[1]), seq=u[2][0])
