"""The short path for well-formed recalls: what it answers itself, what it leaves to FastAPI, and that
both give the client the same thing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.fastpath import FastPost
from tests.factories import make_model, make_world, publish_bundle
from tests.service.helpers import running, settings_for


class Inner:
    """The rest of the ASGI stack: records what reaches it and echoes the body it received."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body, more = b"", True
        while more:
            m = await receive()
            body += m.get("body", b"")
            more = m.get("more_body", False)
        self.seen.append((scope["path"], body))
        await send({"type": "http.response.start", "status": 418, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"inner:" + body})


def _client(handler: Any) -> tuple[httpx.AsyncClient, Inner]:
    inner = Inner()
    app = FastPost(inner, path="/v1/recall", handler=handler)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t"), inner


def test_fast_path_answers_well_formed_posts_and_hands_everything_else_over():
    async def handler(doc: Any) -> bytes:
        if doc.get("fail"):
            raise ValueError("not mine to answer")
        return json.dumps({"got": doc}).encode()

    async def main() -> None:
        c, inner = _client(handler)
        async with c:
            r = await c.post("/v1/recall", json={"k": 3})
            assert r.status_code == 200 and r.json() == {"got": {"k": 3}}
            assert r.headers["content-type"] == "application/json" and inner.seen == []

            async def chunks():  # a streamed body arrives in pieces and is put back together
                for part in (b'{"k"', b": 4", b"}"):
                    yield part

            r = await c.post("/v1/recall", content=chunks(), headers={"content-type": "application/json; charset=utf-8"})
            assert r.json() == {"got": {"k": 4}} and inner.seen == []

            # the inner app gets exactly the body the client sent, whatever the reason for handing over
            cases = [("/v1/recall", b'{"fail": true}', "application/json"),  # the handler raised
                     ("/v1/recall", b'{"k": ', "application/json"),  # not JSON
                     ("/v1/recall", b'{"k": 3}', "text/plain"),  # not declared JSON
                     ("/v1/recall/batch", b'{"k": 3}', "application/json")]  # another route
            for path, body, ctype in cases:
                r = await c.post(path, content=body, headers={"content-type": ctype})
                assert r.status_code == 418 and r.content == b"inner:" + body, (path, body, ctype)
            assert [b for _, b in inner.seen] == [b for _, b, _ in cases]
            assert (await c.get("/v1/recall")).status_code == 418  # other methods too

    asyncio.run(main())


@pytest.fixture(scope="module")
def world():
    return make_world(n_users=30, n_items=100, per_user=6, seed=2)


def test_fast_and_fastapi_paths_give_the_same_answers_and_errors(tmp_path: Path, world, redis_url, redis_prefix):
    """The same requests to an app with the fast path and one without (TT_FAST_PATH=false): status,
    bytes and content type must match, and the fast path's answers count under the route's label."""
    publish_bundle(tmp_path, world, make_model(world, seed=2), index_version="20250101T000000Z-0000fp")
    user = sorted(world.users.index)[0]
    bodies = [{"user_id": user, "k": 5}, {"user_id": int(user), "k": 5}, {"history": [1, 2, 3], "k": 4},
              {"k": 2}, {"user_id": "nobody-knows-me", "k": 3}, {"k": 0}, {"history": [1.5]}, {"surprise": 1},
              {"features": {"age": [1, 2]}}, {"user_id": True}]

    async def main() -> None:
        def conf(fast: bool) -> Any:  # cache off: every answer is computed, on both sides
            return settings_for(tmp_path, redis_url, redis_prefix, cache_ttl_s=0, fast_path=fast)

        async with running(conf(True)) as c, running(conf(False)) as ref:
            for body in bodies:
                raw = json.dumps(body).encode()
                h = {"content-type": "application/json"}
                fast, slow = await c.post("/v1/recall", content=raw, headers=h), \
                    await ref.post("/v1/recall", content=raw, headers=h)
                assert (fast.status_code, fast.content) == (slow.status_code, slow.content), body
                assert fast.headers["content-type"] == slow.headers["content-type"]
            m = (await c.get("/metrics")).text
            assert 'tt_requests_total{method="POST",route="/v1/recall",status="200"}' in m
            assert 'status="422"' in m and 'route="unmatched"' not in m

    asyncio.run(main())
