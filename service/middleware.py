"""One pure-ASGI middleware for every request: request id, body-size limit, metrics, access log.

Pure ASGI (not BaseHTTPMiddleware) because it sits on the hot path of cached recalls, whose whole
budget is a fraction of a millisecond.
"""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.logging import AccessLog, new_request_id, request_id_var
from service.metrics import Metrics


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than {limit} bytes (TT_MAX_BODY_BYTES)")


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_body_bytes: int, access_log: AccessLog | None = None) -> None:
        self.app, self.metrics, self.max_body = app, metrics, max_body_bytes
        self.access_log = access_log if access_log is not None and access_log.enabled else None
        # metric children per (route, method[, status]): labels() costs a lock and a dict build per call
        self._lat: dict[tuple[str, str], Any] = {}
        self._cnt: dict[tuple[str, str, int], Any] = {}

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
            lat = self._lat.get((path, method))
            if lat is None:
                lat = self._lat[(path, method)] = self.metrics.latency.labels(path, method)
            lat.observe(dt)
            cnt = self._cnt.get((path, method, status))
            if cnt is None:
                cnt = self._cnt[(path, method, status)] = self.metrics.requests.labels(path, method, str(status))
            cnt.inc()
            if self.access_log is not None:
                self.access_log.write(method, scope.get("path", ""), path, status, dt * 1000, rid)
            request_id_var.reset(token)

    @staticmethod
    async def _reply(send: Send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
