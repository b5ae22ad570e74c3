"""A short path through the ASGI stack for the hottest route's well-formed requests.

A POST /v1/recall through FastAPI passes its exception middleware, the router (matching every
route's regex), dependency solving, the endpoint wrapper and a Response object before the service
does any work: ~0.15 ms of CPU per request on the 2-core benchmark machine, as much as the rest of a
cached answer. ``FastPost`` answers POSTs to its path whose body is declared and parsed as JSON
itself: the same parsing (``json.loads``, as FastAPI does), the same pydantic model, the same work
(``service.routes.recall.fast_recall``), the same bytes out.

When that work raises, the answer comes from the app's own exception handlers (``errors``: the
app's ``exception_handlers``, looked up by the exception's class and its bases, as Starlette does),
so an invalid body, an unknown feature, no bundle yet or shutting down get the very status, body
and headers FastAPI would give. The work runs once per request either way. An exception no handler
claims is a 500 and is raised on, as Starlette's server-error layer does.

What never reaches the work goes through FastAPI untouched, with the body already read: other
paths and methods, bodies not declared as JSON, bodies that are not JSON at all (FastAPI words
that error), and a client that went away mid-body.

It sits inside ``RequestContextMiddleware`` and outside FastAPI's own middleware stack (see
``service.app._API``), so request ids, the body-size limit, metrics and the access log cover both
paths alike, and a fast answer skips FastAPI's error, telemetry and body-limit layers too.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

Handler = Callable[[Request, Any], Awaitable[bytes]]  # (request, parsed JSON body) -> response body
ErrorHandler = Callable[[Request, Any], Response | Awaitable[Response]]  # Starlette's handler shape


class FastPost:
    def __init__(self, app: ASGIApp, *, path: str, handler: Handler,
                 errors: Mapping[Any, ErrorHandler] | None = None, route: Any = None) -> None:
        self.app, self.path, self.handler, self.route = app, path, handler, route
        self.errors = errors if errors is not None else {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST" \
                or not _json_content(scope):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away before sending it all
                await self.app(scope, _replay(b"".join(chunks), receive, message), send)
                return
            chunks.append(message.get("body", b""))
            more = bool(message.get("more_body", False))
        body = b"".join(chunks)
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):  # not JSON, or nested too deep: FastAPI words that (the work has not run)
            await self.app(scope, _replay(body, receive), send)
            return
        if self.route is not None:
            scope["route"] = self.route  # the route template for metrics and the access log
        request = Request(scope, receive)
        try:
            answer = await self.handler(request, doc)
        except Exception as exc:
            handler = self._handler_for(exc)
            if handler is None:
                # as Starlette's ServerErrorMiddleware: a bare 500 for the client, the error raised on
                await PlainTextResponse("Internal Server Error", status_code=500)(scope, receive, send)
                raise
            response = handler(request, exc)
            if inspect.isawaitable(response):
                response = await response
            await response(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"%d" % len(answer)), (b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": answer})

    def _handler_for(self, exc: Exception) -> ErrorHandler | None:
        for cls in type(exc).__mro__:
            if cls in self.errors:
                return self.errors[cls]
        return None


def _json_content(scope: Scope) -> bool:
    """Whether the request says its body is JSON, as FastAPI decides it (application/json, +json)."""
    for k, v in scope["headers"]:
        if k == b"content-type":
            media = v.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))
    return False


def _replay(body: bytes, receive: Receive, pending: Message | None = None) -> Receive:
    """A ``receive`` that hands out the body already read, then whatever the client sends next."""
    sent = False

    async def replay() -> Message:
        nonlocal sent, pending
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": pending is not None}
        if pending is not None:
            msg, pending = pending, None
            return msg
        return await receive()

    return replay
