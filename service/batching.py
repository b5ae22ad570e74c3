"""Micro-batching: concurrent requests coalesced into one call of a batch function.

Requests wait in an asyncio queue. A collector takes the first one, waits for a free compute slot,
then takes whatever else is queued (up to ``max_size``), waiting at most ``max_wait_s`` counted from
the first request's arrival. Under load the slot is busy longer than ``max_wait_s``, so batches fill
with no added wait; alone, a request waits at most ``max_wait_s``. The batch function runs in a
thread pool (torch and FAISS release the GIL), so the event loop keeps serving HTTP meanwhile.

Items are grouped by ``key`` before the call: the service keys by the bundle object a request took,
so one batch never mixes model/index versions even while a new bundle is being swapped in.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger(__name__)

BatchFn = Callable[[list[T]], Sequence[R | BaseException]]


class BatcherClosed(RuntimeError):
    """The service is shutting down and takes no new work."""


def run_grouped(fn: BatchFn, items: list[T], key: Callable[[T], Hashable]) -> list[R | BaseException]:
    """Call ``fn`` once per key group, results back in input order; an exception fails its group only."""
    groups: dict[Hashable, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(key(it), []).append(i)
    out: list[R | BaseException] = [None] * len(items)  # type: ignore[list-item]
    for idx in groups.values():
        try:
            res = fn([items[i] for i in idx])
            if len(res) != len(idx):
                raise RuntimeError(f"batch function returned {len(res)} results for {len(idx)} inputs")
        except Exception as exc:  # one bad group must not take down the others
            res = [exc] * len(idx)
        for i, r in zip(idx, res, strict=True):
            out[i] = r
    return out


class MicroBatcher(Generic[T, R]):
    def __init__(self, fn: BatchFn, *, executor: Executor, max_size: int = 64, max_wait_s: float = 0.002,
                 slots: int = 1, key: Callable[[T], Hashable] = lambda _: None,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        self.fn, self.executor, self.key = fn, executor, key
        self.max_size, self.max_wait_s = max(1, max_size), max(0.0, max_wait_s)
        self.on_batch = on_batch
        self._slots = asyncio.Semaphore(max(1, slots))
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R], float]] = asyncio.Queue()
        self._collector: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False

    def start(self) -> None:
        if self._collector is None:
            self._collector = asyncio.get_running_loop().create_task(self._collect(), name="microbatch-collector")

    async def submit(self, item: T) -> R:
        if self._closed:
            raise BatcherClosed("shutting down")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        self._queue.put_nowait((item, fut, loop.time()))
        return await fut

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            batch = [first]
            await self._slots.acquire()
            try:
                self._drain(batch)
                remaining = first[2] + self.max_wait_s - loop.time()
                if len(batch) < self.max_size and remaining > 0:
                    await asyncio.sleep(remaining)
                    self._drain(batch)
            except BaseException:
                self._slots.release()
                for _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(BatcherClosed("shutting down"))
                raise
            task = loop.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _drain(self, batch: list[tuple[T, asyncio.Future[R], float]]) -> None:
        while len(batch) < self.max_size:
            try:
                batch.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                return

    async def _run(self, batch: list[tuple[T, asyncio.Future[R], float]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            # requests whose caller went away (client disconnect) are not computed
            live = [b for b in batch if not b[1].done()]
            if not live:
                return
            items = [b[0] for b in live]
            t0 = loop.time()
            try:
                results = await loop.run_in_executor(self.executor, run_grouped, self.fn, items, self.key)
            except Exception as exc:
                results = [exc] * len(items)
            if self.on_batch is not None:
                self.on_batch(len(items), loop.time() - t0)
            for (_, fut, _), r in zip(live, results, strict=True):
                if fut.done():
                    continue
                if isinstance(r, BaseException):
                    fut.set_exception(r)
                else:
                    fut.set_result(r)
        finally:
            self._slots.release()

    async def close(self) -> None:
        """Refuse new work, finish what is queued and running."""
        self._closed = True
        while not self._queue.empty() and self._collector is not None and not self._collector.done():
            await asyncio.sleep(0.001)
        while self._running:
            await asyncio.gather(*list(self._running), return_exceptions=True)
        if self._collector is not None:
            self._collector.cancel()
            try:
                await self._collector
            except asyncio.CancelledError:
                pass
            self._collector = None


class DirectRunner(Generic[T, R]):
    """The no-batching twin: each request is its own batch of one, same thread pool, same function."""

    def __init__(self, fn: BatchFn, *, executor: Executor, key: Callable[[T], Hashable] = lambda _: None,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        self.fn, self.executor, self.key, self.on_batch = fn, executor, key, on_batch
        self._closed = False

    def start(self) -> None:
        pass

    async def submit(self, item: T) -> R:
        if self._closed:
            raise BatcherClosed("shutting down")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        (r,) = await loop.run_in_executor(self.executor, run_grouped, self.fn, [item], self.key)
        if self.on_batch is not None:
            self.on_batch(1, loop.time() - t0)
        if isinstance(r, BaseException):
            raise r
        return r

    async def close(self) -> None:
        self._closed = True
