"""The service's moving parts wired together (cache, events, batcher, bundles) and the async glue
the routes call: one method per use case, each a few lines over ``service.pipeline``."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from service.batching import DirectRunner, MicroBatcher
from service.cache import Computed, ResultCache
from service.events import EventStore, MemoryEventStore, RedisEventStore, UserEvents
from service.metrics import Metrics
from service.pipeline import InputError, RecallQuery, ServingBundle, compute_batch, compute_similar, resolve
from service.redisconn import RedisCoalescer, RedisGuard, RedisUnavailable, make_client
from service.reload import BundleManager, NoBundle
from service.settings import Settings

log = logging.getLogger(__name__)


class EventsUnavailable(RuntimeError):
    pass


class UnknownItem(LookupError):
    pass


@dataclass
class EventResult:
    user_id: str
    item_id: Any
    events: int
    warnings: list[str]


class Runtime:
    def __init__(self, settings: Settings, metrics: Metrics, bundles: BundleManager) -> None:
        self.settings, self.metrics, self.bundles = settings, metrics, bundles
        client = (make_client(settings.redis_url, settings.redis_timeout_s, settings.redis_cluster)
                  if settings.redis_enabled else None)
        self.guard = RedisGuard(client, retry_s=settings.redis_retry_s, retry_max_s=settings.redis_retry_max_s,
                                on_change=lambda up: metrics.redis_up.set(1 if up else 0))
        metrics.redis_up.set(1 if client is not None else 0)
        # the request path's Redis traffic (cache reads and writes, event reads and writes): one
        # pipelined round trip per event-loop turn
        self.redis = RedisCoalescer(self.guard) if client is not None else None
        self.cache = ResultCache(guard=self.guard, prefix=settings.redis_prefix, ttl_s=settings.cache_ttl_s,
                                 metrics=metrics, local_ttl_s=settings.local_cache_ttl_s,
                                 local_max_bytes=settings.local_cache_max_bytes, redis=self.redis)
        self.events: EventStore = (RedisEventStore(self.guard, settings.redis_prefix, settings.events_cap,
                                                   settings.events_ttl_s, redis=self.redis,
                                                   hash_tags=settings.redis_cluster)
                                   if client is not None else MemoryEventStore(settings.events_cap))
        # 0 threads: batches are computed on the event loop (see service.batching for why that is the default)
        self.executor = (ThreadPoolExecutor(max_workers=settings.compute_threads, thread_name_prefix="tt-compute",
                                            initializer=_compute_thread_init, initargs=(settings.torch_threads,))
                         if settings.compute_threads > 0 else None)

        def on_batch(n: int, dt: float) -> None:
            metrics.batch_size.observe(n)
            metrics.compute_latency.observe(dt)

        key = _bundle_key
        self.runner: MicroBatcher[Any, bytes] | DirectRunner[Any, bytes]
        if settings.microbatch:
            self.runner = MicroBatcher(compute_batch, executor=self.executor, max_size=settings.microbatch_max_size,
                                       max_wait_s=settings.microbatch_max_wait_ms / 1000.0,
                                       slots=max(1, settings.compute_threads), key=key, on_batch=on_batch, announced=True)
        else:
            self.runner = DirectRunner(compute_batch, executor=self.executor, key=key, on_batch=on_batch)
        self._tasks: list[asyncio.Task[None]] = []
        self._side_tasks: set[asyncio.Task[Any]] = set()
        self.shutting_down = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.settings.torch_threads:
            _limit_threads(self.settings.torch_threads)
        self.runner.start()
        if self.guard.configured:
            await self.guard.ping()
            self._tasks.append(asyncio.create_task(self.guard.watch(1.0), name="redis-watch"))
        await self.bundles.refresh()
        if self.settings.reload_poll_s > 0:
            self._tasks.append(asyncio.create_task(self.bundles.poll(self.settings.reload_poll_s), name="bundle-poll"))
        if self.settings.redis_enabled:
            from service.bundles import notice_channel
            from service.events import events_channel
            from service.notices import Handler, listen

            async def on_bundle(_: bytes) -> None:
                await self.bundles.refresh()

            def on_event(data: bytes) -> None:
                self.cache.user_changed(data.decode("utf-8", "replace"))

            def on_state(up: bool) -> None:
                self.cache.notices_connected(up)
                loop = asyncio.get_running_loop()
                # a publish may have happened while we were not subscribed; a lost subscription is
                # probably Redis itself: find out now, so the cache stops answering at once
                t = loop.create_task(self._refresh_quietly() if up else self.guard.ping())
                self._side_tasks.add(t)  # the loop keeps only weak references to tasks
                t.add_done_callback(self._side_tasks.discard)

            handlers: dict[str, Handler] = {notice_channel(self.settings.redis_prefix): on_bundle,
                        events_channel(self.settings.redis_prefix): on_event}
            self._tasks.append(asyncio.create_task(
                listen(self.settings.redis_url, handlers, on_state=on_state, stopped=lambda: self.bundles.stopped,
                       cluster=self.settings.redis_cluster),
                name="notices"))

    async def _refresh_quietly(self) -> None:
        try:
            await self.bundles.refresh()
        except Exception:  # logged by the manager; the poller tries again
            log.exception("bundle refresh after reconnect failed")

    async def stop(self) -> None:
        self.shutting_down = True
        self.bundles.stopped = True
        await self.runner.close()
        await self.cache.drain()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.guard.close()
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=False)

    def bundle(self) -> ServingBundle:
        b = self.bundles.current
        if b is None:
            raise NoBundle("no bundle is loaded yet: run `twotower reindex` (or wait for the one being published)")
        return b

    # ------------------------------------------------------------------ use cases
    async def recall(self, q: RecallQuery, bundle: ServingBundle | None = None) -> tuple[bytes, bool]:
        """(answer body without "cached", served_from_cache)."""
        b = bundle or self.bundle()
        uid = q.user_id
        key = self.cache.key(b.index_version, q.canonical(), uid)
        seq_key = self.events.seq_key(uid) if uid is not None else None
        local_seq = self.events.local_seq(uid) if uid is not None else None
        # from here until it reaches the batcher (or needs no computation) this request is company
        # worth waiting for: a batch being formed waits for it instead of a fixed delay
        ticket = self.runner.announce()

        async def compute() -> Computed:
            ev: UserEvents | None = None
            cacheable = True
            if uid is not None:
                try:
                    ev = await self.events.read(uid)
                except RedisUnavailable:
                    cacheable = False  # answered without the user's recent events: do not keep it
            r = resolve(b, q, ev)
            if r.fallback:
                self.metrics.fallbacks.inc()
            body = await self.runner.submit(r, ticket)
            return Computed(body, ev.seq if ev is not None else None, cacheable)

        try:
            return await self.cache.get_or_compute(key, uid, seq_key, local_seq, compute, on_wait=ticket.release)
        finally:
            ticket.release()

    async def recall_many(self, qs: list[RecallQuery]) -> list[tuple[bytes, bool]]:
        b = self.bundle()  # one bundle for the whole batch request
        res = await asyncio.gather(*(self.recall(q, b) for q in qs), return_exceptions=True)
        out: list[tuple[bytes, bool]] = []
        for i, r in enumerate(res):
            if isinstance(r, InputError):
                raise InputError(("body", "requests", i, *r.loc[1:]), r.msg, r.kind)
            if isinstance(r, BaseException):
                raise r
            out.append(r)
        return out

    async def similar(self, item_id: str, k: int) -> tuple[bytes, bool]:
        b = self.bundle()
        parsed = b.parse_item(item_id)
        if parsed is None:
            raise UnknownItem(f"item {item_id!r} is not in index {b.index_version}")
        key = self.cache.key(b.index_version, f'["similar",{parsed!r},{k}]'.encode())

        async def compute() -> Computed:
            if self.executor is None:
                body = compute_similar(b, parsed, k)
            else:
                body = await asyncio.get_running_loop().run_in_executor(self.executor, compute_similar, b, parsed, k)
            return Computed(body, None)

        return await self.cache.get_or_compute(key, None, None, None, compute)

    async def add_event(self, user_id: str, item_id: Any, ts: int | None) -> EventResult:
        warnings: list[str] = []
        b = self.bundles.current
        token = str(item_id).strip()
        out_id: Any = item_id
        if b is not None:
            try:
                out_id = b.id_map.parse(item_id)
            except ValueError as exc:
                raise InputError(("body", "item_id"), str(exc)) from None
            token = str(out_id)
            if out_id not in b.id_map:
                warnings.append(f"item {out_id!r} is not in index {b.index_version}: recorded, but it only "
                                "affects recalls once a bundle containing it is served")
        try:
            n, _seq = await self.events.append(user_id, token, ts)
        except RedisUnavailable as exc:
            self.metrics.events.labels(result="unavailable").inc()
            raise EventsUnavailable(f"the event store (Redis) is unavailable, the event was NOT recorded: {exc}. "
                                    "Retry later.") from None
        # before answering: the next recall of this user in this process must not come from memory
        self.cache.user_changed(user_id)
        self.metrics.events.labels(result="stored").inc()
        return EventResult(user_id, out_id, n, warnings)

    # ------------------------------------------------------------------ health
    def readiness(self) -> tuple[int, dict[str, Any]]:
        b = self.bundles.current
        redis_state = "disabled" if not self.guard.configured else ("up" if self.guard.up else "down")
        doc: dict[str, Any] = {
            "bundle": None if b is None else {"model_version": b.model_version, "index_version": b.index_version,
                                              "items": b.n_items},
            "redis": redis_state,
            "cache": self.cache.mode if redis_state != "down" else "bypassed",
            "events": self.events.backend,
            "microbatch": self.settings.microbatch,
        }
        if self.bundles.last_error:
            doc["last_bundle_error"] = self.bundles.last_error
        if redis_state == "down" and self.guard.last_error:
            doc["redis_error"] = self.guard.last_error
        if self.shutting_down:
            doc["status"] = "shutting_down"
            return 503, doc
        if b is None:
            doc["status"] = "not_ready"
            return 503, doc
        doc["status"] = "degraded" if redis_state == "down" else "ready"
        return 200, doc


def _limit_threads(n: int) -> None:
    """Threads inside one compute call: FAISS's OpenMP team, NumPy's BLAS (the user tower's matrix
    products), and torch's intra-op pool where torch is installed (the api image has none)."""
    from threadpoolctl import threadpool_limits

    from index.searcher import set_threads

    set_threads(n)
    threadpool_limits(limits=n, user_api="blas")
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(n)


def _compute_thread_init(threads: int) -> None:
    """OpenMP's thread count is per calling thread: set in the main thread only, a FAISS search in a
    compute thread runs with the default team (every core). In an experiment that moved only the
    search into a thread, the server's CPU doubled (OpenMP workers spinning) for fewer answers."""
    if threads:
        from index.searcher import set_threads

        set_threads(threads)


def _bundle_key(r: Any) -> int:
    return id(r.bundle)
