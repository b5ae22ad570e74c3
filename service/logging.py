"""JSON log lines carrying the request id of the request being served.

The id comes from the caller's ``X-Request-ID`` header when it is sane (printable, <= 128 chars),
otherwise a fresh one is made; it is echoed in the response header and stamped on every log line
written while the request runs (a contextvar, so concurrent requests never mix ids).
"""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import os
import re
import sys
import time
import uuid
from typing import Any

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("tt_request_id", default=None)

_SANE_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")
# LogRecord attributes that are not "extra" fields
_STD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


# Generated ids: a random per-process prefix and a counter (unique, 32 hex chars like a uuid4, but
# without a urandom syscall per request, which cost ~9 us under load)
_ID_PREFIX = uuid.uuid4().hex[:16]
_id_counter = itertools.count(int.from_bytes(os.urandom(4), "big"))


def new_request_id(incoming: str | None) -> str:
    if incoming and _SANE_ID.match(incoming):
        return incoming
    return f"{_ID_PREFIX}{next(_id_counter) & 0xFFFFFFFFFFFFFFFF:016x}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid is not None:
            out["request_id"] = rid
        for k, v in record.__dict__.items():
            if k not in _STD_ATTRS and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "INFO") -> None:
    """Route the root logger (and uvicorn's) through one JSON handler on stderr.

    Uvicorn's own access log is turned off by the CLI: the service writes its own access line per
    request, with the request id and latency, from the middleware.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers = []
        lg.propagate = True


class AccessLog:
    """One JSON line per request, in the same shape as ``JsonFormatter``'s, written without the
    logging machinery (LogRecord, formatter, a write and flush per line): on the cached path that
    machinery alone cost a fifth of the request. Lines are buffered and flushed within
    ``flush_s`` (and at shutdown), so a crash can lose at most that much access log.
    """

    def __init__(self, stream: Any = None, flush_s: float = 0.1, logger_name: str = "service.access") -> None:
        self._stream = stream if stream is not None else sys.stderr
        self.enabled = logging.getLogger(logger_name).isEnabledFor(logging.INFO)
        self._logger = json.dumps(logger_name)
        self._buf: list[str] = []
        self._flush_s = flush_s
        self._scheduled = False
        self._sec = -1
        self._sec_text = ""
        self._routes: dict[str, str] = {}

    def write(self, method: str, path: str, route: str, status: int, ms: float, request_id: str) -> None:
        now = time.time()
        sec = int(now)
        if sec != self._sec:
            self._sec, self._sec_text = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        msg = json.dumps(f"{method} {path} {status}")
        r = self._routes.get(route)
        if r is None:
            r = self._routes[route] = json.dumps(route)
        # request ids are limited to characters that need no JSON escaping (see new_request_id)
        rid = f'"{request_id}"' if _SANE_ID.match(request_id) else json.dumps(request_id)
        self._buf.append(
            f'{{"ts": "{self._sec_text}.{int((now - sec) * 1000):03d}Z", "level": "INFO", "logger": {self._logger}, '
            f'"msg": {msg}, "request_id": {rid}, "route": {r}, "status": {status}, "ms": {ms:.3f}}}\n')
        if len(self._buf) >= 256:
            self.flush()
        elif not self._scheduled:
            try:
                import asyncio

                asyncio.get_running_loop().call_later(self._flush_s, self.flush)
                self._scheduled = True
            except RuntimeError:  # no loop (called from a thread): write now
                self.flush()

    def flush(self) -> None:
        self._scheduled = False
        if not self._buf:
            return
        data, self._buf = "".join(self._buf), []
        try:
            self._stream.write(data)
            self._stream.flush()
        except (OSError, ValueError):  # stderr closed at shutdown: nothing sensible to do
            pass
