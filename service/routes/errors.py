"""How the service's own exceptions become HTTP answers. ``create_app`` installs ``HANDLERS`` on
the app; the fast path (service.fastpath) answers its failures through the same table, so an error
looks the same whichever way the request went."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service.batching import BatcherClosed
from service.pipeline import InputError
from service.reload import NoBundle
from service.runtime import EventsUnavailable, UnknownItem


async def input_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InputError)
    return JSONResponse({"detail": [{"loc": list(exc.loc), "msg": exc.msg, "type": exc.kind}]}, status_code=422)


async def no_bundle(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "5"})


async def closing(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": "the service is shutting down"}, status_code=503,
                        headers={"Retry-After": "1", "Connection": "close"})


async def events_down(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})


async def unknown_item(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc.args[0])}, status_code=404)


async def invalid(request: Request, exc: Exception) -> JSONResponse:
    # FastAPI's default, minus the echoed input (it can be a megabyte of history) and ctx objects
    assert isinstance(exc, RequestValidationError)
    errs = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()]
    return JSONResponse({"detail": errs}, status_code=422)


HANDLERS: dict[Any, Callable[[Request, Exception], Awaitable[JSONResponse]]] = {
    InputError: input_error,
    NoBundle: no_bundle,
    BatcherClosed: closing,
    EventsUnavailable: events_down,
    UnknownItem: unknown_item,
    RequestValidationError: invalid,
}
