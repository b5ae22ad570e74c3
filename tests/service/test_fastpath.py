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


class Refused(Exception):
    pass


async def _refused(request: Any, exc: Exception) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"refused": str(exc)}, status_code=409, headers={"x-handler": "refused"})


def _client(handler: Any) -> tuple[httpx.AsyncClient, Inner]:
    inner = Inner()
    app = FastPost(inner, path="/v1/recall", handler=handler, errors={Refused: _refused})
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t"), inner


def test_fast_path_answers_well_formed_posts_and_hands_everything_else_over():
    calls: list[Any] = []

    async def handler(request: Any, doc: Any) -> bytes:
        calls.append(doc)
        if doc.get("refuse"):
            raise Refused("not this one")
        if doc.get("crash"):
            raise RuntimeError("a bug")
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

            # a failure of the work is answered by the error handler for its class, and the work
            # ran once: the request is not handed to the inner app to be done again
            calls.clear()
            r = await c.post("/v1/recall", json={"refuse": True})
            assert (r.status_code, r.json(), r.headers["x-handler"]) == (409, {"refused": "not this one"}, "refused")
            assert calls == [{"refuse": True}] and inner.seen == []
            # an exception no handler claims: a bare 500 for the client, the error raised on
            with pytest.raises(RuntimeError, match="a bug"):
                await c.post("/v1/recall", json={"crash": True})

            # the inner app gets exactly the body the client sent when the work cannot start
            calls.clear()
            cases = [("/v1/recall", b'{"k": ', "application/json"),  # not JSON
                     ("/v1/recall", b'{"k": 3}', "text/plain"),  # not declared JSON
                     ("/v1/recall/batch", b'{"k": 3}', "application/json")]  # another route
            for path, body, ctype in cases:
                r = await c.post(path, content=body, headers={"content-type": ctype})
                assert r.status_code == 418 and r.content == b"inner:" + body, (path, body, ctype)
            assert [b for _, b in inner.seen] == [b for _, b, _ in cases] and calls == []
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


def test_a_failing_recall_runs_once_and_gets_the_apps_own_error_answer(tmp_path: Path, world, redis_url,
                                                                       redis_prefix):
    """A recall that fails half-way (after its cache lookup) is worked on once, not handed to FastAPI
    to be done a second time: one call of the runtime, one cache lookup counted, and the same 422 and
    503 answers as the FastAPI route gives."""
    user = sorted(world.users.index)[0]
    bad = {"user_id": user, "features": {"age": ["old"]}}  # valid JSON shape; refused by the pipeline, after the cache lookup

    def misses(text: str) -> float:
        for line in text.splitlines():
            if line.startswith('tt_cache_lookups_total{result="miss"}'):
                return float(line.split()[-1])
        return 0.0

    async def main() -> None:
        def conf(fast: bool) -> Any:
            return settings_for(tmp_path, redis_url, redis_prefix, fast_path=fast)

        async with running(conf(True)) as c, running(conf(False)) as ref:
            answers = {}
            for name, client in (("fast", c), ("fastapi", ref)):
                rt = client.app.state.runtime  # type: ignore[attr-defined]
                calls: list[Any] = []
                original = rt.recall

                async def counted(q: Any, bundle: Any = None, _calls: list[Any] = calls, _f: Any = original) -> Any:
                    _calls.append(q)
                    return await _f(q, bundle)

                rt.recall = counted
                before = misses((await client.get("/metrics")).text)
                r = await client.post("/v1/recall", json=bad)
                after = misses((await client.get("/metrics")).text)
                assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "features", "age"], r.text
                assert len(calls) == 1, f"{name}: the recall ran {len(calls)} times"
                assert after - before == 1, f"{name}: {after - before} cache lookups for one request"
                answers[name] = (r.status_code, r.content)
            assert answers["fast"] == answers["fastapi"]

        # no bundle published in this directory: 503 with the handler's Retry-After, worked on once
        async with running(settings_for(tmp_path / "empty", redis_url, redis_prefix)) as c:
            rt = c.app.state.runtime  # type: ignore[attr-defined]
            calls = []
            original = rt.recall

            async def counted_once(q: Any, bundle: Any = None) -> Any:
                calls.append(q)
                return await original(q, bundle)

            rt.recall = counted_once
            r = await c.post("/v1/recall", json={"user_id": user})
            assert r.status_code == 503 and r.headers["retry-after"] == "5" and "no bundle" in r.json()["detail"]
            assert len(calls) == 1

    publish_bundle(tmp_path, world, make_model(world, seed=2), index_version="20250101T000000Z-0001fp")
    asyncio.run(main())
