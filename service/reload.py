"""Which bundle is served, and swapping to a newly published one without dropping a request.

A new bundle is validated and loaded in a worker thread while the old one keeps serving; the swap
is one attribute assignment (atomic under the GIL). Requests take ``manager.current`` once and keep
that object, so an answer is always computed from one (model, index) pair. A bundle that fails
validation or loading is logged and counted, never made current.

Triggers: a Redis pub/sub notice on ``<prefix>:bundles`` (``index.bundle.channel``; any payload, the
pointer file is re-read, the message is not trusted; see ``service.notices``), polling ``bundles/CURRENT`` every ``reload_poll_s`` seconds,
and ``POST /v1/admin/reload``. Polling reacts to the pointer *changing*, so a bundle pinned by an
admin reload (rollback) stays until the next publish.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable
from pathlib import Path

from service.metrics import Metrics
from service.pipeline import ServingBundle

log = logging.getLogger(__name__)


class NoBundle(RuntimeError):
    """Nothing published yet (or nothing loadable)."""


class BundleManager:
    def __init__(self, artifacts: Path, metrics: Metrics, *,
                 loader: Callable[[Path], ServingBundle],
                 pointer: Callable[[Path], Path | None],
                 version_dir: Callable[[Path, str], Path]) -> None:
        self.artifacts = Path(artifacts)
        self.metrics = metrics
        self._loader = loader
        self._pointer = pointer
        self._version_dir = version_dir
        self.current: ServingBundle | None = None
        self._last_pointer: Path | None = None
        self._lock = asyncio.Lock()
        self.last_error: str | None = None
        # redis-py's pubsub read can swallow a cancellation; loops also check this flag
        self.stopped = False

    def _read_pointer(self) -> Path | None:
        try:
            return self._pointer(self.artifacts)
        except Exception as exc:  # unreadable pointer: keep serving what we have
            self.last_error = f"cannot read the bundle pointer: {exc}"
            log.warning(self.last_error)
            return None

    async def refresh(self, *, force: bool = False) -> bool:
        """Load the bundle bundles/CURRENT names if it is not the one served. True when swapped."""
        async with self._lock:
            target = await asyncio.to_thread(self._read_pointer)
            if target is None:
                return False
            if not force and self._last_pointer is not None and target == self._last_pointer:
                return False
            self._last_pointer = target
            if self.current is not None and self.current.path is not None \
                    and Path(self.current.path).resolve() == Path(target).resolve() and not force:
                return False
            return await self._load(target)

    async def load_version(self, index_version: str) -> bool:
        """Serve a specific published bundle (rollback). Raises NoBundle when it is not there."""
        try:  # version_dir refuses "..", "/x", "a/b": a version is one directory under bundles/
            target = self._version_dir(self.artifacts, index_version)
        except ValueError as exc:
            raise NoBundle(f"{index_version!r} is not a bundle version ({exc})") from None
        if not target.is_dir():
            raise NoBundle(f"no bundle {index_version!r} under {target.parent}")
        async with self._lock:
            if not await self._load(target):
                raise NoBundle(f"bundle {index_version!r} cannot be served: {self.last_error}")
            return True

    async def _load(self, target: Path) -> bool:
        try:
            bundle = await asyncio.to_thread(self._loader, target)
        except Exception as exc:  # a corrupt bundle must never take the service down
            self.last_error = f"{target.name}: {exc.__class__.__name__}: {exc}"
            self.metrics.reloads.labels(result="failed").inc()
            log.error("bundle rejected, still serving %s", self.current.index_version if self.current else "nothing",
                      extra={"bundle": str(target), "error": self.last_error})
            return False
        old = self.current
        self.current = bundle
        # A bundle is hundreds of thousands of long-lived objects (id maps, per-user histories and
        # seen sets). Left to the cyclic GC, every full collection walks them all: a stall of
        # hundreds of ms in the middle of requests. Freezing moves them out of the GC's view;
        # they are still freed by reference counting when the bundle is replaced.
        gc.freeze()
        self.last_error = None
        self.metrics.reloads.labels(result="loaded").inc()
        self.metrics.set_bundle(bundle.model_version, bundle.index_version)
        log.info("serving bundle", extra={"index_version": bundle.index_version,
                                          "model_version": bundle.model_version,
                                          "previous": old.index_version if old else None})
        return True

    # ------------------------------------------------------------------ background triggers
    async def poll(self, interval_s: float) -> None:
        while not self.stopped:
            await asyncio.sleep(interval_s)
            try:
                await self.refresh()
            except Exception:  # never let the watcher die
                log.exception("bundle poll failed")
