"""The FastAPI app: ``create_app(settings)`` wires the pieces together and does nothing else.

- routes: one ``APIRouter`` module per area in ``service/routes/`` (recall, items, events, admin,
  ops), each a thin wrapper over one ``Runtime`` method (``service/runtime.py``);
- errors: ``service.routes.errors.HANDLERS``, the app's exception handlers;
- heavy things (the bundle, the Redis client, the micro-batcher) are created in the lifespan,
  never at import;
- outside FastAPI's own stack: ``RequestContextMiddleware`` (request id, body limit, metrics,
  access log) and, inside it, ``FastPost`` (service/fastpath.py), which answers well-formed
  ``POST /v1/recall`` without FastAPI's routing and answers its failures with the same handlers.

A request's path, then: uvicorn -> RequestContextMiddleware -> FastPost (POST /v1/recall with a
JSON body) or FastAPI's router -> routes/<area>.py -> Runtime -> service.pipeline.
"""

import inspect
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp

from service.fastpath import FastPost
from service.logging import AccessLog, configure_logging
from service.metrics import Metrics
from service.middleware import RequestContextMiddleware
from service.reload import BundleManager
from service.routes import admin, events, items, ops, recall
from service.routes.errors import HANDLERS
from service.runtime import Runtime
from service.schemas import make_models
from service.settings import Settings

log = logging.getLogger(__name__)

AREAS = (recall, items, events, admin, ops)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics.create()
    models = make_models(settings)
    access_log = AccessLog() if settings.access_log else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from service.bundles import bundle_dir, current_pointer, load_serving_bundle

        bundles = BundleManager(settings.artifacts, metrics, loader=load_serving_bundle, pointer=current_pointer,
                                version_dir=bundle_dir)
        runtime = Runtime(settings, metrics, bundles)
        app.state.runtime = runtime
        await runtime.start()
        if bundles.current is None:
            log.warning("no bundle to serve yet; /readyz answers 503 until one is published",
                        extra={"artifacts": str(settings.artifacts), "error": bundles.last_error})
        try:
            yield
        finally:
            await runtime.stop()
            if access_log is not None:
                access_log.flush()

    app = _API(
        **_telemetry(settings),
        title="twotower recall service",
        version="1",
        description="Candidate retrieval with a two-tower model: the user tower embeds the request, "
                    "a FAISS index returns the nearest items. Answers are cached in Redis.",
        lifespan=lifespan,
        exception_handlers=dict(HANDLERS),
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.access_log = access_log
    for area in AREAS:
        app.include_router(area.router(settings, models))

    # Our layers go around FastAPI's whole stack (see _API): the request context first (ids,
    # limits, metrics, access log), then FastPost, which answers well-formed recalls without
    # FastAPI's routing machinery (service/fastpath.py) and hands everything else inwards.
    def outer(inner: ASGIApp) -> ASGIApp:
        if settings.fast_path:
            inner = FastPost(inner, path="/v1/recall", handler=recall.fast_recall(models),
                             errors=app.exception_handlers,
                             route=SimpleNamespace(path="/v1/recall"))  # what the metrics read of scope["route"]
        return RequestContextMiddleware(inner, metrics=metrics, max_body_bytes=settings.max_body_bytes,
                                        access_log=access_log)

    app.outer = outer
    return app


class _API(FastAPI):
    """FastAPI with room for layers outside its own middleware stack (server-error handler,
    telemetry, body limit, user middleware, exception handlers): ``outer`` wraps the built stack.
    For a fast-path recall those inner layers were ~30 us of CPU that did nothing."""

    outer: Callable[[ASGIApp], ASGIApp] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        return self.outer(stack) if self.outer is not None else stack


def _telemetry(settings: Settings) -> dict[str, Any]:
    """FastAPI's native OpenTelemetry hooks (FastAPI >= 0.16x) follow TT_OTEL. Off, they cost
    nothing; on but with no provider configured they still ask the global providers on every
    request (~30 us, a tenth of a cached recall). Older FastAPI has no such hooks."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    on = settings.otel
    return {"telemetry": {"tracing": on, "metrics": on, "logs": on}}


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory service.app:app_from_env`` (settings from TT_* variables)."""
    settings = Settings()
    configure_logging(settings.log_level)
    return create_app(settings)
