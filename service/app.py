"""The FastAPI app: ``create_app(settings)``. Heavy things (the bundle, Redis client, thread pool)
are created in the lifespan, never at import; routes are thin wrappers over ``Runtime`` methods.

No ``from __future__ import annotations`` here: the request models are built per app from the
settings (so the OpenAPI page shows this deployment's limits) and FastAPI must see them as objects.
"""

import hmac
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp

from service.batching import BatcherClosed
from service.fastpath import FastPost
from service.logging import AccessLog, configure_logging
from service.metrics import Metrics
from service.middleware import RequestContextMiddleware
from service.pipeline import InputError, RecallQuery, with_cached
from service.reload import BundleManager, NoBundle
from service.runtime import EventsUnavailable, Runtime, UnknownItem
from service.schemas import (
    BatchRecallResponse,
    EventResponse,
    RecallResponse,
    ReloadRequest,
    ReloadResponse,
    SimilarResponse,
    make_models,
)
from service.settings import Settings
from towers.schema import normalize_user_id

log = logging.getLogger(__name__)

_JSON = "application/json"
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "the body is not decodable JSON"},
    413: {"description": "request body larger than TT_MAX_BODY_BYTES"},
    503: {"description": "no bundle loaded yet, or shutting down"},
}


def _query(body: Any, user_id: str | None) -> RecallQuery:
    return RecallQuery(user_id=user_id, history=body.history, features=body.features, k=body.k,
                       exclude_seen=body.exclude_seen, exclude_ids=body.exclude_ids)


def _user_id_or_422(value: Any, loc: tuple[str | int, ...]) -> str | None:
    if value is None:
        return None
    try:
        return normalize_user_id(value)
    except ValueError as exc:
        raise InputError(loc, str(exc)) from None


def runtime_of(request: Request) -> Runtime:
    return request.app.state.runtime


async def get_runtime(request: Request) -> Runtime:
    return runtime_of(request)


# The ops and admin routes take the runtime as a dependency. The hot routes (recall, batch, similar,
# events) take the Request and call runtime_of(): a dependency costs ~15 us per request in
# FastAPI's resolver, about a tenth of a cached recall.
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
_bearer = HTTPBearer(auto_error=False, description="TT_ADMIN_TOKEN")


def require_admin(request: Request,
                  creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    expected = request.app.state.settings.admin_token.get_secret_value()
    if not expected:
        raise HTTPException(403, "admin endpoints are disabled: set TT_ADMIN_TOKEN to enable them")
    given = creds.credentials if creds is not None else ""
    # constant time: the comparison must not leak how many leading characters were right
    if not hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8")):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics.create()
    models = make_models(settings)
    RecallRequest, BatchRecallRequest, EventRequest = models.RecallRequest, models.BatchRecallRequest, models.EventRequest

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
    )
    app.state.settings = settings
    app.state.metrics = metrics
    access_log = AccessLog() if settings.access_log else None
    app.state.access_log = access_log
    # Our layers go around FastAPI's whole stack (see _API): the request context first (ids,
    # limits, metrics, access log), then FastPost, which answers well-formed recalls without
    # FastAPI's routing machinery (service/fastpath.py) and hands everything else inwards.
    def outer(inner: ASGIApp) -> ASGIApp:
        if settings.fast_path:
            inner = FastPost(inner, path="/v1/recall", handler=fast_recall,
                             route=SimpleNamespace(path="/v1/recall"))  # what the metrics read of scope["route"]
        return RequestContextMiddleware(inner, metrics=metrics, max_body_bytes=settings.max_body_bytes,
                                        access_log=access_log)

    app.outer = outer

    # ------------------------------------------------------------------ errors
    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError) -> JSONResponse:
        return JSONResponse({"detail": [{"loc": list(exc.loc), "msg": exc.msg, "type": exc.kind}]}, status_code=422)

    @app.exception_handler(NoBundle)
    async def _no_bundle(request: Request, exc: NoBundle) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(BatcherClosed)
    async def _closing(request: Request, exc: BatcherClosed) -> JSONResponse:
        return JSONResponse({"detail": "the service is shutting down"}, status_code=503,
                            headers={"Retry-After": "1", "Connection": "close"})

    @app.exception_handler(EventsUnavailable)
    async def _events_down(request: Request, exc: EventsUnavailable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(UnknownItem)
    async def _unknown_item(request: Request, exc: UnknownItem) -> JSONResponse:
        return JSONResponse({"detail": str(exc.args[0])}, status_code=404)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default, minus the echoed input (it can be a megabyte of history) and ctx objects
        errs = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                for e in exc.errors()]
        return JSONResponse({"detail": errs}, status_code=422)

    # ------------------------------------------------------------------ recall
    @app.post("/v1/recall", response_model=RecallResponse, responses=_ERRORS, tags=["recall"],
              summary="Top-k items for one user")
    async def recall(body: RecallRequest, request: Request) -> Response:  # type: ignore[valid-type]
        q = _query(body, _user_id_or_422(body.user_id, ("body", "user_id")))  # type: ignore[attr-defined]
        answer, cached = await runtime_of(request).recall(q)
        return Response(with_cached(answer, cached), media_type=_JSON)

    async def fast_recall(doc: Any) -> bytes:
        # what recall() does, minus FastAPI: any exception hands the request back to the route above
        body = RecallRequest.model_validate(doc)
        q = _query(body, _user_id_or_422(body.user_id, ("body", "user_id")))  # type: ignore[attr-defined]
        answer, cached = await app.state.runtime.recall(q)
        return with_cached(answer, cached)

    @app.post("/v1/recall/batch", response_model=BatchRecallResponse, responses=_ERRORS, tags=["recall"],
              summary=f"Top-k items for up to {settings.max_batch_users} users")
    async def recall_batch(body: BatchRecallRequest, request: Request) -> Response:  # type: ignore[valid-type]
        reqs = body.requests  # type: ignore[attr-defined]
        qs = [_query(r, _user_id_or_422(r.user_id, ("body", "requests", i, "user_id"))) for i, r in enumerate(reqs)]
        answers = await runtime_of(request).recall_many(qs)
        return Response(b'{"results":[' + b",".join(with_cached(a, c) for a, c in answers) + b"]}",
                        media_type=_JSON)

    @app.get("/v1/items/{item_id}/similar", response_model=SimilarResponse, responses={404: {}, **_ERRORS},
             tags=["recall"], summary="Items nearest to an item in the index")
    async def similar(request: Request,
                      item_id: Annotated[str, Path(min_length=1, max_length=256)],
                      k: Annotated[int, Query(ge=1, le=settings.max_k)] = settings.default_k) -> Response:
        answer, cached = await runtime_of(request).similar(item_id, k)
        return Response(with_cached(answer, cached), media_type=_JSON)

    # ------------------------------------------------------------------ events
    @app.post("/v1/events", response_model=EventResponse, response_model_exclude_none=True,
              responses=_ERRORS, tags=["events"], summary="Record that a user interacted with an item")
    async def post_event(body: EventRequest, request: Request) -> EventResponse:  # type: ignore[valid-type]
        uid = _user_id_or_422(body.user_id, ("body", "user_id"))  # type: ignore[attr-defined]
        assert uid is not None
        res = await runtime_of(request).add_event(uid, body.item_id, body.timestamp)  # type: ignore[attr-defined]
        return EventResponse(user_id=res.user_id, item_id=res.item_id, events=res.events, warnings=res.warnings or None)

    # ------------------------------------------------------------------ admin
    @app.post("/v1/admin/reload", response_model=ReloadResponse, tags=["admin"],
              dependencies=[Depends(require_admin)],
              responses={400: {"description": "the body is not decodable JSON"},
                         401: {"description": "missing or wrong token"}, 403: {"description": "admin disabled"},
                         404: {"description": "no such bundle"},
                         409: {"description": "the bundle CURRENT names was rejected; the previous one is still served"}},
              summary="Load the current (or a named) bundle now")
    async def reload(rt: RuntimeDep, body: ReloadRequest | None = None) -> ReloadResponse:
        before = rt.bundles.current
        try:
            if body is not None and body.index_version:
                await rt.bundles.load_version(body.index_version)
            elif (not await rt.bundles.refresh(force=True) and rt.bundles.last_error
                  and rt.bundles.current is not None):
                # a 200 "changed: false" would hide that the published bundle was refused
                raise HTTPException(409, f"{rt.bundles.last_error}; still serving {rt.bundles.current.index_version}")
        except NoBundle as exc:
            raise HTTPException(404, str(exc)) from None
        b = rt.bundles.current
        if b is None:
            raise HTTPException(503, rt.bundles.last_error or "no bundle published yet")
        changed = before is None or (before.index_version, before.model_version) != (b.index_version, b.model_version)
        return ReloadResponse(changed=changed, model_version=b.model_version, index_version=b.index_version)

    # ------------------------------------------------------------------ ops
    @app.get("/healthz", tags=["ops"], summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], summary="Ready to serve: bundle loaded; 'degraded' when Redis is down",
             responses={503: {"description": "no bundle loaded, or shutting down"}})
    async def readyz(rt: RuntimeDep) -> JSONResponse:
        code, doc = rt.readiness()
        return JSONResponse(doc, status_code=code)

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        data, ctype = metrics.render()
        return Response(data, media_type=ctype)

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
