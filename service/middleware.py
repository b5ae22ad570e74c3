"""One pure-ASGI middleware for every request: request id, body-size limit, metrics, access log.

Pure ASGI (not BaseHTTPMiddleware) because it sits on the hot path of cached recalls, whose whole
budget is a fraction of a millisecond.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.logging import new_request_id, request_id_var
from service.metrics import Metrics

log = logging.getLogger("service.access")


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than {limit} bytes (TT_MAX_BODY_BYTES)")


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_body_bytes: int, access_log: bool = True) -> None:
        self.app, self.metrics, self.max_body = app, metrics, max_body_bytes
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        incoming_id = None
        length = None
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                incoming_id = v.decode("latin-1")
            elif k == b"content-length":
                length = v
        rid = new_request_id(incoming_id)
        token = request_id_var.set(rid)
        rid_header = (b"x-request-id", rid.encode("latin-1"))
        state: dict[str, Any] = {"status": 500, "started": False}
        limit = self.max_body

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                state["started"] = True
                message["headers"] = [*message.get("headers", []), rid_header]
            await send(message)

        try:
            if length is not None:
                try:
                    too_big = int(length) > limit
                except ValueError:
                    too_big = False  # h11/httptools reject malformed lengths before we get here
                if too_big:
                    await self._reply(send_wrapper, 413, f"request body is larger than {limit} bytes (TT_MAX_BODY_BYTES)")
                    return
            received = 0

            async def receive_wrapper() -> Message:
                # chunked bodies carry no Content-Length: count what actually arrives
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise BodyTooLarge(limit)
                return message

            try:
                await self.app(scope, receive_wrapper, send_wrapper)
            except BodyTooLarge as exc:
                if state["started"]:
                    raise
                await self._reply(send_wrapper, 413, str(exc.detail))
        finally:
            dt = time.perf_counter() - t0
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            status = state["status"]
            self.metrics.latency.labels(path, method).observe(dt)
            self.metrics.requests.labels(path, method, str(status)).inc()
            if self.access_log:
                log.info("%s %s %s", method, scope.get("path", ""), status,
                         extra={"route": path, "status": status, "ms": round(dt * 1000, 3)})
            request_id_var.reset(token)

    @staticmethod
    async def _reply(send: Send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
