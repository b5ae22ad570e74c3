"""The pipelining Redis client of the request path, against real redis-servers."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import redis
from redis import exceptions as rex

from service.resp import RespClient, pack, parse_reply
from tests.service.conftest import PrivateRedis


def test_commands_and_transactions_round_trip_any_bytes(redis_url, redis_prefix, redis_client):
    big = bytes(range(256)) * 4096  # 1 MiB with every byte value, \r\n included: many TCP reads
    k = f"{redis_prefix}:k"

    async def main() -> None:
        c = RespClient(redis_url, 2.0)
        assert await c.execute([("SET", k, big, "EX", 60), ("MGET", k, f"{redis_prefix}:none")]) == \
            [b"OK", [big, None]]
        assert await c.execute([("RPUSH", f"{redis_prefix}:l", "a", "é"), ("INCRBY", f"{redis_prefix}:n", 41),
                                ("INCR", f"{redis_prefix}:n")]) == [2, 41, 42]
        # MULTI/EXEC: EXEC's reply holds the commands' replies
        got = await c.execute([("MULTI",), ("LRANGE", f"{redis_prefix}:l", 0, -1), ("GET", f"{redis_prefix}:n"),
                               ("EXEC",)])
        assert got == [b"OK", b"QUEUED", b"QUEUED", [[b"a", "é".encode()], b"42"]]
        await c.aclose()

    asyncio.run(main())
    assert redis_client.get(k) == big


def test_overlapping_batches_on_one_connection_get_their_own_replies(redis_url, redis_prefix):
    async def main() -> None:
        c = RespClient(redis_url, 2.0)

        async def one(i: int) -> list:
            key = f"{redis_prefix}:c{i}"
            return await c.execute([("SET", key, str(i) * (i + 1)), ("GET", key), ("STRLEN", key)])

        res = await asyncio.gather(*(one(i) for i in range(200)))
        assert res == [[b"OK", (str(i) * (i + 1)).encode(), len(str(i) * (i + 1))] for i in range(200)]
        await c.aclose()

    asyncio.run(main())


def test_an_error_reply_raises_and_leaves_the_connection_usable(redis_url, redis_prefix):
    async def main() -> None:
        c = RespClient(redis_url, 2.0)
        await c.execute([("SET", f"{redis_prefix}:s", "x")])
        with pytest.raises(rex.ResponseError, match="WRONGTYPE"):
            await c.execute([("LPUSH", f"{redis_prefix}:s", "y")])
        assert await c.execute([("GET", f"{redis_prefix}:s")]) == [b"x"]
        await c.aclose()

    asyncio.run(main())


def test_refused_killed_and_hung_redis_raise_redis_errors_then_it_reconnects(private_redis: PrivateRedis):
    async def main() -> None:
        c = RespClient(private_redis.url, 0.3)
        assert await c.execute([("PING",)]) == [b"PONG"]
        private_redis.stop()
        with pytest.raises(rex.ConnectionError):
            await c.execute([("PING",)])  # the old connection is gone
        with pytest.raises(rex.ConnectionError):
            await c.execute([("PING",)])  # and nothing listens: refused
        private_redis.start()
        assert await c.execute([("PING",)]) == [b"PONG"]
        # a hung server: the call gives up after the timeout, and the late reply is never mistaken
        # for the answer to a later call (the connection is dropped)
        assert private_redis.proc is not None
        await c.execute([("SET", "hung", "before")])
        private_redis.proc.send_signal(signal.SIGSTOP)
        t0 = time.perf_counter()
        with pytest.raises(rex.TimeoutError):
            await c.execute([("GET", "hung")])
        assert time.perf_counter() - t0 < 2.0
        private_redis.proc.send_signal(signal.SIGCONT)
        assert await c.execute([("SET", "hung", "after"), ("GET", "hung")]) == [b"OK", b"after"]
        await c.aclose()

    asyncio.run(main())


def test_password_and_database_from_the_url(tmp_path, free_port):
    r = PrivateRedis(free_port, tmp_path, "--requirepass", "s3cret")
    r.start()
    try:
        async def main() -> None:
            c = RespClient(f"redis://:s3cret@127.0.0.1:{free_port}/3", 1.0)
            assert await c.execute([("SET", "where", "db3")]) == [b"OK"]
            await c.aclose()
            bad = RespClient(f"redis://:wrong@127.0.0.1:{free_port}/0", 1.0)
            with pytest.raises(rex.ConnectionError, match="refused the connection setup"):
                await bad.execute([("PING",)])

        asyncio.run(main())
        check = redis.Redis(port=free_port, password="s3cret", db=3)
        assert check.get("where") == b"db3"
        check.close()
    finally:
        r.stop()


def test_tls_urls_are_left_to_redis_py():
    with pytest.raises(ValueError, match="TLS"):
        RespClient("rediss://127.0.0.1:6380/0", 1.0)


def test_replies_cut_anywhere_are_incomplete_never_wrong():
    # what a socket may deliver: any prefix of the stream of replies
    stream = b"+OK\r\n:42\r\n$5\r\nhe\r\nl\r\n$-1\r\n*3\r\n$1\r\na\r\n*0\r\n:-7\r\n-ERR boom\r\n"
    want = [b"OK", 42, b"he\r\nl", None, [b"a", [], -7]]
    for cut in range(len(stream) + 1):
        buf, pos, got = stream[:cut], 0, []
        while True:
            r = parse_reply(buf, pos)
            if r is None:
                break
            got.append(r[0])
            pos = r[1]
        assert got == (want + [got[-1]] if len(got) == 6 else want[:len(got)]), cut
    last = parse_reply(stream, len(stream) - len(b"-ERR boom\r\n"))
    assert last is not None and isinstance(last[0], rex.ResponseError) and str(last[0]) == "ERR boom"


def test_pack_refuses_arguments_redis_would_misread():
    assert pack([("SET", "k", 3)]) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n3\r\n"
    with pytest.raises(TypeError):
        pack([("SET", "k", True)])
    with pytest.raises(TypeError):
        pack([("SET", "k", None)])  # type: ignore[list-item]
