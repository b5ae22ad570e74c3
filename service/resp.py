"""A small pipelining Redis client for the request hot path (result cache and event reads).

Why not redis-py there: its asyncio pipeline costs ~230 us of CPU per round trip on the 2-core
benchmark machine (command stack, connection pool, response callbacks), against ~65 us for a bare
write + read on an ``asyncio.Protocol``; at ~2 round trips per uncached recall that was a sixth of
the request. Everything else (pub/sub, the event MULTI on POST /v1/events, health pings, the
reindex job's notices) keeps using redis-py.

What it does: one TCP (or unix-socket) connection, opened on first use and again after a failure;
``execute(commands)`` writes a batch of commands in one send and resolves when all their replies
have arrived. Batches may overlap on the connection (real pipelining): Redis answers in order, so
replies are matched to batches first-in first-out. RESP2 only, no TLS (``rediss://`` URLs are
refused with ValueError, and the caller falls back to redis-py).

Failures raise redis-py's exception types, so ``RedisGuard`` treats both clients alike: a lost or
refused connection -> ``ConnectionError`` (every batch waiting on it fails), no answer within
``timeout_s`` -> ``TimeoutError`` (the connection is dropped, since late replies would be
mismatched), an error reply -> ``ResponseError``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any

from redis import exceptions as rex
from redis.connection import parse_url

Arg = bytes | str | int | float
Reply = bytes | int | list[Any] | None | rex.ResponseError

_CRLF = b"\r\n"


def pack(commands: Sequence[Sequence[Arg]]) -> bytes:
    """RESP arrays of bulk strings, one per command, as one buffer."""
    out: list[bytes] = []
    for cmd in commands:
        out.append(b"*%d\r\n" % len(cmd))
        for a in cmd:
            if isinstance(a, bytes):
                b = a
            elif isinstance(a, str):
                b = a.encode("utf-8")
            elif isinstance(a, bool):  # bool is an int: refuse rather than send "True"
                raise TypeError("bool is not a Redis argument")
            elif isinstance(a, (int, float)):
                b = repr(a).encode()
            else:
                raise TypeError(f"cannot send {type(a).__name__} to Redis")
            out.append(b"$%d\r\n" % len(b))
            out.append(b)
            out.append(_CRLF)
    return b"".join(out)


class ProtocolError(rex.ConnectionError):
    """The server sent something that is not RESP2: the connection cannot be trusted any more."""


def parse_reply(buf: bytearray | bytes, pos: int) -> tuple[Reply, int] | None:
    """One reply starting at ``pos`` -> (value, position after it), or None if not complete yet.
    Error replies come back as ``ResponseError`` values (raised by the caller, not here)."""
    end = buf.find(_CRLF, pos)
    if end < 0:
        return None
    kind = buf[pos]
    line = bytes(buf[pos + 1:end])
    nxt = end + 2
    if kind == 0x24:  # $ bulk string
        n = int(line)
        if n < 0:
            return None, nxt
        stop = nxt + n
        if len(buf) < stop + 2:
            return None
        return bytes(buf[nxt:stop]), stop + 2
    if kind == 0x2B:  # + simple string
        return line, nxt
    if kind == 0x3A:  # : integer
        return int(line), nxt
    if kind == 0x2A:  # * array
        n = int(line)
        if n < 0:
            return None, nxt
        items: list[Any] = []
        for _ in range(n):
            got = parse_reply(buf, nxt)
            if got is None:
                return None
            items.append(got[0])
            nxt = got[1]
        return items, nxt
    if kind == 0x2D:  # - error
        return rex.ResponseError(line.decode("utf-8", "replace")), nxt
    raise ProtocolError(f"unexpected byte {kind!r} in a Redis reply")


class _Batch:
    __slots__ = ("future", "want", "replies")

    def __init__(self, future: asyncio.Future[list[Reply]], want: int) -> None:
        self.future, self.want = future, want
        self.replies: list[Reply] = []


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.pending: deque[_Batch] = deque()
        self.closed = False
        self.error: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio's classes

    def send(self, data: bytes, want: int) -> asyncio.Future[list[Reply]]:
        fut: asyncio.Future[list[Reply]] = asyncio.get_running_loop().create_future()
        if self.closed or self.transport is None:
            fut.set_exception(rex.ConnectionError(str(self.error or "connection closed")))
            return fut
        self.pending.append(_Batch(fut, want))
        self.transport.write(data)
        return fut

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        try:
            while self.pending:
                batch = self.pending[0]
                while len(batch.replies) < batch.want:
                    got = parse_reply(buf, pos)
                    if got is None:
                        return
                    batch.replies.append(got[0])
                    pos = got[1]
                self.pending.popleft()
                if not batch.future.done():
                    batch.future.set_result(batch.replies)
            if pos < len(buf):
                raise ProtocolError("Redis sent a reply nobody asked for")
        except (ValueError, IndexError, ProtocolError) as exc:
            self.fail(exc if isinstance(exc, ProtocolError) else ProtocolError(f"malformed Redis reply: {exc}"))
        finally:
            if pos:
                del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(rex.ConnectionError(f"connection to Redis lost: {exc}" if exc else "Redis closed the connection"))

    def fail(self, exc: Exception) -> None:
        self.closed = True
        self.error = self.error or exc
        while self.pending:
            fut = self.pending.popleft().future
            if not fut.done():
                fut.set_exception(type(exc)(str(exc)))
        if self.transport is not None:
            self.transport.abort()


class RespClient:
    """``await execute([("MGET", k1, k2), ("SET", k, v, "EX", 60)])`` -> replies in command order."""

    def __init__(self, url: str, timeout_s: float) -> None:
        opts = parse_url(url)
        cls = opts.get("connection_class")
        if cls is not None and "SSL" in cls.__name__:
            raise ValueError("TLS Redis URLs are not supported by the pipelining client")
        self.host: str = opts.get("host", "localhost")
        self.port: int = int(opts.get("port", 6379))
        self.path: str | None = opts.get("path")
        self.db = int(opts.get("db", 0) or 0)
        self.username: str | None = opts.get("username")
        self.password: str | None = opts.get("password")
        self.timeout_s = timeout_s
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None

    async def execute(self, commands: Sequence[Sequence[Arg]], raise_on_error: bool = True) -> list[Reply]:
        if not commands:
            return []
        data = pack(commands)
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connect()
        fut = conn.send(data, len(commands))
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.timeout_s, _time_out, conn, fut, self.timeout_s)
        try:
            replies = await fut
        finally:
            timer.cancel()
        if raise_on_error:
            for r in replies:
                if isinstance(r, rex.ResponseError):
                    raise r
                if isinstance(r, list):
                    for x in r:  # EXEC: the replies of a transaction's commands
                        if isinstance(x, rex.ResponseError):
                            raise x
        return replies

    async def _connect(self) -> _Connection:
        # concurrent callers share one connection attempt
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._open())
        return await asyncio.shield(self._connecting)

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout_s):
                if self.path:
                    _, conn = await loop.create_unix_connection(_Connection, self.path)
                else:
                    _, conn = await loop.create_connection(_Connection, self.host, self.port)
                hello: list[tuple[Arg, ...]] = []
                if self.password is not None:
                    hello.append(("AUTH", self.username, self.password) if self.username else ("AUTH", self.password))
                if self.db:
                    hello.append(("SELECT", self.db))
                if hello:
                    for r in await conn.send(pack(hello), len(hello)):
                        if isinstance(r, rex.ResponseError):
                            conn.fail(rex.ConnectionError(str(r)))
                            raise rex.ConnectionError(f"Redis refused the connection setup: {r}")
        except TimeoutError:
            raise rex.TimeoutError(f"connecting to Redis took longer than {self.timeout_s}s") from None
        except OSError as exc:
            raise rex.ConnectionError(f"cannot connect to Redis: {exc}") from None
        self._conn = conn
        return conn

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            conn.fail(rex.ConnectionError("client closed"))


def _time_out(conn: _Connection, fut: asyncio.Future[list[Reply]], timeout_s: float) -> None:
    if not fut.done():
        # replies still on their way would be matched to the wrong batch: drop the connection
        conn.fail(rex.TimeoutError(f"no reply from Redis within {timeout_s}s"))
