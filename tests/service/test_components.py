"""Cache, event store, Redis breaker and micro-batcher against a real Redis."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.batching import DirectRunner, MicroBatcher
from service.cache import Computed, ResultCache
from service.events import MemoryEventStore, RedisEventStore
from service.metrics import Metrics
from service.redisconn import RedisGuard, RedisUnavailable, make_client


def _guard(url: str, retry_s: float = 0.3) -> RedisGuard:
    return RedisGuard(make_client(url, 0.25), retry_s=retry_s, retry_max_s=1.0)


def _cache(url: str, prefix: str, **kw: float) -> tuple[RedisGuard, ResultCache]:
    """A breaker over the test Redis and a result cache (TTL 60 s) in front of it."""
    g = _guard(url)
    return g, ResultCache(guard=g, prefix=prefix, ttl_s=60, metrics=Metrics.create(), **kw)


class _Counting:
    """A cache's compute function that counts its calls: each answers ``answer(calls so far)``,
    after ``delay_s`` (long enough for identical requests to pile up behind it)."""

    def __init__(self, answer: Callable[[int], Computed], delay_s: float = 0.0) -> None:
        self.answer, self.delay_s, self.calls = answer, delay_s, 0

    async def __call__(self) -> Computed:
        self.calls += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return self.answer(self.calls)


def test_cache_hit_after_miss_and_keys_are_namespaced_by_prefix_and_index_version(redis_url, redis_prefix, redis_client):
    async def main() -> None:
        g, cache = _cache(redis_url, redis_prefix, local_ttl_s=0)
        compute = _Counting(lambda _: Computed(b'{"items":[]}', None))

        key = cache.key("v1", b"req")
        assert key.startswith(f"{redis_prefix}:v1:rec:v1:")
        assert await cache.get_or_compute(key, None, None, None, compute) == (b'{"items":[]}', False)
        assert await cache.get_or_compute(key, None, None, None, compute) == (b'{"items":[]}', True)
        assert compute.calls == 1
        # a new index version is a different key: the old entry is unreachable
        assert (await cache.get_or_compute(cache.key("v2", b"req"), None, None, None, compute))[1] is False
        assert 0 < redis_client.ttl(key) <= 60
        await g.close()

    asyncio.run(main())


def test_an_event_invalidates_that_users_cached_answer(redis_url, redis_prefix):
    async def main() -> None:
        g, cache = _cache(redis_url, redis_prefix)
        events = RedisEventStore(g, redis_prefix, cap=10, ttl_s=60)
        n = 0

        async def compute() -> Computed:
            nonlocal n
            n += 1
            ev = await events.read("u1")
            return Computed(f'{{"n":{n},"h":{len(ev.items)}}}'.encode(), ev.seq)

        key = cache.key("v1", b"u1")
        seq_key = events.seq_key("u1")
        assert await cache.get_or_compute(key, "u1", seq_key, None, compute) == (b'{"n":1,"h":0}', False)
        assert await cache.get_or_compute(key, "u1", seq_key, None, compute) == (b'{"n":1,"h":0}', True)
        await events.append("u1", "42")
        assert await cache.get_or_compute(key, "u1", seq_key, None, compute) == (b'{"n":2,"h":1}', False)
        assert await cache.get_or_compute(key, "u1", seq_key, None, compute) == (b'{"n":2,"h":1}', True)
        await g.close()

    asyncio.run(main())


def test_local_level_answers_hot_keys_and_forgets_a_user_on_an_event_notice(redis_url, redis_prefix, redis_client):
    async def main() -> None:
        g, cache = _cache(redis_url, redis_prefix, local_ttl_s=5)
        compute = _Counting(lambda n: Computed(str(n).encode(), 0))

        anon, mine = cache.key("v1", b"anon"), cache.key("v1", b"u1")
        seq_key = f"{redis_prefix}:v1:evseq:u1"
        assert await cache.get_or_compute(anon, None, None, None, compute) == (b"1", False)
        await cache.drain()  # the write to Redis goes behind the answer: let it land before deleting
        redis_client.delete(anon)  # gone from Redis, still answered from this process
        assert await cache.get_or_compute(anon, None, None, None, compute) == (b"1", True)
        # a named user's answer is kept in memory only while event notices are flowing
        assert await cache.get_or_compute(mine, "u1", seq_key, None, compute) == (b"2", False)
        await cache.drain()
        redis_client.delete(mine)
        assert await cache.get_or_compute(mine, "u1", seq_key, None, compute) == (b"3", False)
        cache.notices_connected(True)
        assert await cache.get_or_compute(mine, "u1", seq_key, None, compute) == (b"3", True)
        await cache.drain()
        redis_client.delete(mine)
        assert await cache.get_or_compute(mine, "u1", seq_key, None, compute) == (b"3", True)
        cache.user_changed("u1")
        assert await cache.get_or_compute(mine, "u1", seq_key, None, compute) == (b"4", False)

        # a computation that read its input before an event must not land in memory after it
        async def slow() -> Computed:
            await asyncio.sleep(0.05)
            return Computed(b"stale", 0)

        other = cache.key("v1", b"u2")
        task = asyncio.create_task(cache.get_or_compute(other, "u2", None, None, slow))
        await asyncio.sleep(0.01)
        cache.user_changed("u2")
        assert (await task)[0] == b"stale"
        await cache.drain()
        redis_client.delete(other)
        assert await cache.get_or_compute(other, "u2", None, None, compute) == (b"5", False)
        await g.close()

    asyncio.run(main())


def test_identical_concurrent_misses_are_computed_once(redis_url, redis_prefix):
    async def main() -> None:
        g, cache = _cache(redis_url, redis_prefix)
        compute = _Counting(lambda _: Computed(b"{}", None), delay_s=0.05)

        key = cache.key("v1", b"same")
        res = await asyncio.gather(*(cache.get_or_compute(key, None, None, None, compute) for _ in range(20)))
        assert compute.calls == 1
        assert all(body == b"{}" for body, _ in res)
        await g.close()

    asyncio.run(main())


class _Knocks:
    """A listener on a dead Redis's port that counts the connections made to it and drops each at
    once: how often a client still went to the network after Redis died."""

    def __init__(self, port: int) -> None:
        self.count = 0
        self._sock = socket.create_server(("127.0.0.1", port))
        self._sock.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            self.count += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()


def test_dead_redis_costs_no_errors_and_no_round_trip_per_request_then_recovers(private_redis):
    async def main() -> None:
        retry_s = 0.2
        g = _guard(private_redis.url, retry_s=retry_s)
        cache = ResultCache(guard=g, prefix="tt-test", ttl_s=60, metrics=Metrics.create())
        events = RedisEventStore(g, "tt-test", cap=10, ttl_s=60)

        async def compute() -> Computed:
            return Computed(b"{}", None)

        assert await g.ping()
        private_redis.stop()
        # first call notices the failure; the breaker then skips Redis without touching the network
        assert await cache.get_or_compute("k", None, None, None, compute) == (b"{}", False)
        assert not g.up
        knocks = _Knocks(private_redis.port)
        try:
            t0 = time.monotonic()
            for _ in range(200):
                assert await cache.get_or_compute("k", None, None, None, compute) == (b"{}", False)
            elapsed = time.monotonic() - t0
            with pytest.raises(RedisUnavailable):
                await events.append("u", "1")
        finally:
            knocks.close()
        # at most one probe per backoff period (retry_s, doubling), however long the loop took on a
        # busy machine; without the breaker every one of the 201 calls would have connected
        assert knocks.count <= 2 + elapsed / retry_s, (knocks.count, elapsed)
        assert knocks.count < 20, knocks.count
        private_redis.start()
        watcher = asyncio.create_task(g.watch(0.05))
        deadline = time.monotonic() + 30
        while not g.up and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        watcher.cancel()
        assert g.up, "the breaker did not close after Redis came back"
        await cache.get_or_compute("k", None, None, None, compute)
        assert (await cache.get_or_compute("k", None, None, None, compute))[1] is True
        await g.close()

    asyncio.run(main())


def test_event_list_is_capped_but_seen_set_keeps_everything(redis_url, redis_prefix, redis_client):
    async def main() -> None:
        g = _guard(redis_url)
        for store in (RedisEventStore(g, redis_prefix, cap=3, ttl_s=60), MemoryEventStore(cap=3)):
            for i, ts in enumerate([100, 200, 300, 400, 150]):
                n, seq = await store.append("7", str(i + 1), ts)
            assert (n, seq) == (3, 5)
            ev = await store.read("7")
            # newest 3 by arrival (3, 4, 5) ordered by their timestamps (5 happened at 150)
            assert ev.items == ["5", "3", "4"]
            assert ev.seen == {"1", "2", "3", "4", "5"}
            assert ev.seq == 5
        assert redis_client.llen(f"{redis_prefix}:v1:events:7") == 3
        assert 0 < redis_client.ttl(f"{redis_prefix}:v1:seen:7") <= 60
        await g.close()

    asyncio.run(main())


def test_microbatcher_coalesces_concurrent_requests_and_groups_by_key():
    calls: list[list[tuple[str, int]]] = []
    lock = threading.Lock()

    def fn(items: list[tuple[str, int]]) -> list[int]:
        with lock:
            calls.append(items)
        assert len({k for k, _ in items}) == 1, "a batch mixed keys"
        time.sleep(0.01)
        if items[0][0] == "bad":
            raise ValueError("boom")
        return [v * 2 for _, v in items]

    async def main() -> None:
        ex = ThreadPoolExecutor(1)
        mb: MicroBatcher[tuple[str, int], int] = MicroBatcher(fn, executor=ex, max_size=8, max_wait_s=0.005,
                                                              key=lambda it: it[0])
        mb.start()
        items = [("a" if i % 2 else "b", i) for i in range(40)] + [("bad", 99)]
        res = await asyncio.gather(*(mb.submit(it) for it in items), return_exceptions=True)
        assert res[:40] == [i * 2 for i in range(40)]
        assert isinstance(res[40], ValueError)
        assert max(len(c) for c in calls) <= 8
        assert len(calls) < 41 / 2, f"no coalescing: {len(calls)} calls for 41 requests"
        await mb.close()
        ex.shutdown()

        ex = ThreadPoolExecutor(1)
        direct: DirectRunner[tuple[str, int], int] = DirectRunner(fn, executor=ex)
        calls.clear()
        assert await asyncio.gather(*(direct.submit(("a", i)) for i in range(5))) == [0, 2, 4, 6, 8]
        assert [len(c) for c in calls] == [1] * 5
        ex.shutdown()

    asyncio.run(main())


def test_lone_request_waits_for_company_up_to_max_wait_then_goes_alone():
    def fn(items: list[int]) -> list[int]:
        return items

    async def main() -> None:
        ex = ThreadPoolExecutor(1)
        mb: MicroBatcher[int, int] = MicroBatcher(fn, executor=ex, max_size=64, max_wait_s=0.05)
        mb.start()
        await mb.submit(0)
        for i in range(10):
            t0 = time.perf_counter()
            # goes alone: a batcher that waited for a full batch would never answer (the deadline
            # is generous: only a hang exceeds it)
            assert await asyncio.wait_for(mb.submit(i), 30) == i
            # ...after waiting for company: a timer never fires early, however busy the machine
            assert time.perf_counter() - t0 >= 0.04
        await mb.close()
        ex.shutdown()

    asyncio.run(main())


async def _settle(turns: int = 50) -> None:
    """Let the event loop run every ready callback a few times over (no time passes on a timer)."""
    for _ in range(turns):
        await asyncio.sleep(0)


def test_announced_batches_go_as_soon_as_nobody_else_is_on_the_way():
    calls: list[list[int]] = []

    def fn(items: list[int]) -> list[int]:
        calls.append(list(items))
        return items

    async def main() -> None:
        # max_wait is far beyond the deadlines below: a batch that waited it out fails the test
        mb: MicroBatcher[int, int] = MicroBatcher(fn, executor=None, max_size=64, max_wait_s=600, announced=True)
        mb.start()
        # alone: no waiting out max_wait
        assert await asyncio.wait_for(mb.submit(1, mb.announce()), 30) == 1

        # a request announced but still on its way (say, in its cache lookup) is waited for...
        late = mb.announce()
        early = asyncio.create_task(mb.submit(2, mb.announce()))
        await _settle()
        assert not early.done(), "the batch left without the announced request"
        assert await asyncio.wait_for(asyncio.gather(early, mb.submit(3, late)), 30) == [2, 3]
        assert calls[-1] == [2, 3], "the batch left without the announced request"

        # ...and one that turns out to need no computation (a cache hit) releases the batch
        hit = mb.announce()
        waiting = asyncio.create_task(mb.submit(4, mb.announce()))
        await _settle()
        assert not waiting.done(), "the batch left while a request was still announced"
        hit.release()
        hit.release()  # twice is harmless
        assert await asyncio.wait_for(waiting, 30) == 4
        assert calls[-1] == [4] and mb.upstream == 0
        await mb.close()

    asyncio.run(main())


def test_batches_run_on_the_event_loop_without_an_executor():
    threads: set[int] = set()

    def fn(items: list[int]) -> list[int]:
        threads.add(threading.get_ident())
        return [i + 1 for i in items]

    async def main() -> None:
        mb: MicroBatcher[int, int] = MicroBatcher(fn, executor=None, max_wait_s=0.001)
        mb.start()
        assert await asyncio.gather(*(mb.submit(i) for i in range(10))) == list(range(1, 11))
        await mb.close()
        direct: DirectRunner[int, int] = DirectRunner(fn, executor=None)
        assert await direct.submit(5) == 6

    asyncio.run(main())
    assert threads == {threading.get_ident()}


def test_a_fresh_answer_reaches_redis_behind_the_response_and_is_reused_meanwhile(redis_url, redis_prefix,
                                                                                redis_client):
    async def main() -> None:
        g, cache = _cache(redis_url, redis_prefix, local_ttl_s=0)
        compute = _Counting(lambda _: Computed(b'{"items":[1]}', None))

        key = cache.key("v1", b"fresh")
        assert await cache.get_or_compute(key, None, None, None, compute) == (b'{"items":[1]}', False)
        # the write may still be on its way; an identical request in the meantime is not recomputed
        assert await cache.get_or_compute(key, None, None, None, compute) == (b'{"items":[1]}', True)
        await cache.drain()
        assert compute.calls == 1
        assert redis_client.get(key) == b'-\n{"items":[1]}'
        await g.close()

    asyncio.run(main())


def test_a_cancelled_request_does_not_strand_the_identical_ones_waiting_on_it(redis_url, redis_prefix):
    async def main() -> None:
        g, cache = _cache(redis_url, redis_prefix, local_ttl_s=0)
        started, release, joined = asyncio.Event(), asyncio.Event(), asyncio.Event()
        calls = 0

        async def compute() -> Computed:
            nonlocal calls
            calls += 1
            n = calls
            if n == 1:  # the leader: computing until it is cancelled
                started.set()
                await release.wait()
            return Computed(b'{"n":%d}' % n, None)

        key = cache.key("v1", b"shared")
        leader = asyncio.create_task(cache.get_or_compute(key, None, None, None, compute))
        await asyncio.wait_for(started.wait(), 30)
        follower = asyncio.create_task(cache.get_or_compute(key, None, None, None, compute,
                                                            on_wait=joined.set))
        await asyncio.wait_for(joined.wait(), 30)  # the follower waits on the leader's computation
        leader.cancel()
        body, cached = await asyncio.wait_for(follower, 30)
        assert leader.cancelled() and body == b'{"n":2}' and cached is False  # computed again, by the follower
        # and an error is shared like an answer: both identical requests see it
        failing = asyncio.Event()

        async def broken() -> Computed:
            await failing.wait()
            raise ValueError("bad input")

        other = cache.key("v1", b"broken")
        waits = 0

        def one_more() -> None:
            nonlocal waits
            waits += 1
            if waits == 2:
                failing.set()  # both others wait on the first: now let it fail

        res = await asyncio.wait_for(asyncio.gather(
            *(cache.get_or_compute(other, None, None, None, broken, on_wait=one_more) for _ in range(3)),
            return_exceptions=True), 30)
        assert all(isinstance(r, ValueError) for r in res) and waits == 2
        await g.close()

    asyncio.run(main())
