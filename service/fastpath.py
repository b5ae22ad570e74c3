"""A short path through the ASGI stack for the hottest route's well-formed requests.

A POST /v1/recall through FastAPI passes its exception middleware, the router (matching every
route's regex), dependency solving, the endpoint wrapper and a Response object before the service
does any work: ~0.15 ms of CPU per request on the 2-core benchmark machine, as much as the rest of a
cached answer. ``FastPost`` answers the requests that FastAPI would answer with a plain 200 itself:
the same parsing (``json.loads``, as FastAPI does), the same pydantic model, the same handler, the
same bytes out.

Everything else goes through FastAPI untouched: other routes and methods, bodies that are not JSON
or do not validate, and any exception the handler raises (``InputError``, no bundle loaded yet,
shutting down, ...). Those are replayed into the normal stack with the body already read, so their
status codes, error bodies and OpenAPI documentation are FastAPI's, by construction. (A replayed
request runs the handler a second time; it has no side effects but a cache read.)

It sits inside ``RequestContextMiddleware`` and outside FastAPI's own middleware stack (see
``service.app._API``), so request ids, the body-size limit, metrics and the access log cover both
paths alike, and a fast answer skips FastAPI's error, telemetry and body-limit layers too.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

Handler = Callable[[Any], Awaitable[bytes]]  # parsed JSON body -> response body; raise to hand over


class FastPost:
    def __init__(self, app: ASGIApp, *, path: str, handler: Handler, route: Any = None) -> None:
        self.app, self.path, self.handler, self.route = app, path, handler, route

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
            answer = await self.handler(json.loads(body))
        except Exception:  # noqa: BLE001 - every failure is FastAPI's to answer, as if we were not here
            await self.app(scope, _replay(body, receive), send)
            return
        if self.route is not None:
            scope["route"] = self.route  # the route template for metrics and the access log
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"%d" % len(answer)), (b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": answer})


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
