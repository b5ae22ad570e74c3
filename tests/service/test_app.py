"""The recall API in-process (httpx over ASGI) against a real bundle on disk and a real Redis."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import redis

from index.bundle import channel
from tests.factories import histories_of, make_model, make_world, publish_bundle
from tests.service.helpers import eventually, running, settings_for

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def world():
    return make_world(n_users=30, n_items=100, per_user=6, seed=1)


@pytest.fixture(scope="module")
def model(world):
    return make_model(world, seed=1)


@pytest.fixture
def artifacts(tmp_path: Path, world, model) -> Path:
    publish_bundle(tmp_path, world, model, index_version="20250101T000000Z-000001")
    return tmp_path


def test_known_user_gets_k_items_with_versions_then_a_cached_answer(artifacts, redis_url, redis_prefix, world):
    seen = set(histories_of(world.interactions)["3"])

    async def main() -> None:
        async with running(settings_for(artifacts, redis_url, redis_prefix)) as c:
            r1 = await c.post("/v1/recall", json={"user_id": "3", "k": 10})
            assert r1.status_code == 200, r1.text
            a1 = r1.json()
            assert len(a1["items"]) == 10
            assert a1["index_version"] == "20250101T000000Z-000001"
            assert a1["model_version"] == "20250101T000000Z-aaaaaa"
            assert a1["cached"] is False and "fallback" not in a1
            assert all(isinstance(it["item_id"], int) for it in a1["items"])
            scores = [it["score"] for it in a1["items"]]
            assert scores == sorted(scores, reverse=True)
            assert not seen & {it["item_id"] for it in a1["items"]}, "exclude_seen let a seen item through"
            # 3 and "3" are the same user: same answer, and it comes from the cache
            r2 = await c.post("/v1/recall", json={"user_id": 3, "k": 10})
            a2 = r2.json()
            assert a2["cached"] is True
            assert a2["items"] == a1["items"]
            # without exclude_seen the seen items may come back
            r3 = (await c.post("/v1/recall", json={"user_id": 3, "k": 100, "exclude_seen": False})).json()
            assert len(r3["items"]) == 100 and seen <= {it["item_id"] for it in r3["items"]}

    asyncio.run(main())


def test_a_multi_interest_model_serves_the_top_k_by_the_best_interest(tmp_path, redis_url, redis_prefix, world):
    """A model with 3 interests per user: the service searches each and merges. The answer is the
    top k unseen items by the user's best interest (brute force over the catalogue), each once;
    a new user's inline history is served the same way."""
    model = make_model(world, seed=4, history_encoder="attention", interests=3)
    publish_bundle(tmp_path, world, model, index_version="20250101T000000Z-0000mi")
    hist = histories_of(world.interactions)
    items = np.asarray(list(world.items.index))
    vecs = model.embed_items(world.items)  # (N, D)

    def expected(user_id: str | None, history: list, k: int) -> list:
        feats = world.users.reindex([user_id]) if user_id else None  # the stored features of a known user
        u = model.embed_users([user_id], feats, [history])  # (1, 3, D)
        assert u.shape == (1, 3, vecs.shape[1])
        best = (u[0] @ vecs.T).max(axis=0)  # (N,)
        best[np.isin(items, history)] = -np.inf
        return items[np.argsort(-best, kind="stable")[:k]].tolist()

    async def main() -> None:
        async with running(settings_for(tmp_path, redis_url, redis_prefix)) as c:
            a = (await c.post("/v1/recall", json={"user_id": "3", "k": 10})).json()
            got = [it["item_id"] for it in a["items"]]
            assert "fallback" not in a and len(set(got)) == 10
            assert got == expected("3", hist["3"][-model.encoder.history_len:], 10)
            inline = list(items[[5, 40, 77]])
            b = (await c.post("/v1/recall", json={"history": [int(i) for i in inline], "k": 8})).json()
            assert "fallback" not in b
            assert [it["item_id"] for it in b["items"]] == expected(None, inline, 8)

    asyncio.run(main())


def test_a_bundle_with_neighbours_ranks_by_tower_score_plus_the_last_items_neighbours(
        tmp_path, redis_url, redis_prefix, world):
    """The bundle blends the last item's neighbours in (weight w): the answer is the top k unseen items
    by best-interest score + w * n / sqrt(T(last) T(item)), n the times an item sat next to the user's
    last item in anyone's history and T an item's total over its neighbours, brute force over the catalogue; neighbours the search alone would not return
    come in. A new user's inline history is served the same way."""
    w = 2.0
    model = make_model(world, seed=4, history_encoder="attention", interests=3)
    publish_bundle(tmp_path, world, model, index_version="20250101T000000Z-0000nb", neighbour_weight=w)
    hist = histories_of(world.interactions)
    items = np.asarray(list(world.items.index))
    col = {it: j for j, it in enumerate(items)}
    n = np.zeros((len(items), len(items)))
    for h in hist.values():
        for a, b in zip(h[:-1], h[1:], strict=True):
            n[col[a], col[b]] += 1
            n[col[b], col[a]] += 1
    total = n.sum(axis=1)
    assert (n > 0).sum(axis=1).max() <= 32  # every item keeps all its neighbours (the table's top 32)
    vecs = model.embed_items(world.items)  # (N, D)

    def expected(user_id: str | None, history: list, k: int, weight: float) -> list:
        feats = world.users.reindex([user_id]) if user_id else None
        u = model.embed_users([user_id], feats, [history])  # (1, 3, D)
        last = col[history[-1]]
        cosine = n[last] / np.sqrt(total[last] * np.maximum(total, 1))  # 0 where n is
        best = (u[0] @ vecs.T).max(axis=0) + weight * cosine  # (N,)
        best[np.isin(items, history)] = -np.inf
        return items[np.argsort(-best, kind="stable")[:k]].tolist()

    async def main() -> None:
        async with running(settings_for(tmp_path, redis_url, redis_prefix)) as c:
            for uid in ("3", "17", "30"):
                a = (await c.post("/v1/recall", json={"user_id": uid, "k": 10})).json()
                got = [it["item_id"] for it in a["items"]]
                served = hist[uid][-model.encoder.history_len:]
                assert got == expected(uid, served, 10, w)
                assert got != expected(uid, served, 10, 0.0)  # the neighbours changed the answer
            inline = list(items[[5, 40, 77]])
            b = (await c.post("/v1/recall", json={"history": [int(i) for i in inline], "k": 8})).json()
            assert [it["item_id"] for it in b["items"]] == expected(None, inline, 8, w)

    asyncio.run(main())


def test_cold_user_gets_popular_fallback_honouring_exclusions(artifacts, redis_url, redis_prefix, world):
    async def main() -> None:
        async with running(settings_for(artifacts, redis_url, redis_prefix)) as c:
            a = (await c.post("/v1/recall", json={"user_id": "stranger", "k": 5})).json()
            assert a["fallback"] == "popular" and len(a["items"]) == 5
            # the documented fallback score: 1 - rank / list length, 1.0 for the most popular
            scores = [it["score"] for it in a["items"]]
            steps = np.diff(scores)
            assert scores[0] == 1.0 and (steps < 0).all() and np.allclose(steps, steps[0]), scores
            top = [it["item_id"] for it in a["items"]]
            b = (await c.post("/v1/recall", json={"k": 5, "exclude_ids": [top[0], str(top[1]), 99999]})).json()
            assert b["fallback"] == "popular"
            got = [it["item_id"] for it in b["items"]]
            assert top[0] not in got and top[1] not in got and len(got) == 5
            assert any("exclude_ids" in w and "99999" in w for w in b["warnings"])

    asyncio.run(main())


def test_inline_history_and_features_use_the_tower_with_warnings_for_what_was_ignored(artifacts, redis_url, redis_prefix):
    async def main() -> None:
        async with running(settings_for(artifacts, redis_url, redis_prefix)) as c:
            a = (await c.post("/v1/recall", json={"features": {"age": 33, "country": "fr"}, "k": 5})).json()
            assert "fallback" not in a and len(a["items"]) == 5
            b = (await c.post("/v1/recall", json={"user_id": "new-user", "history": [1, "2", 5000, "x"],
                                                  "features": {"age": 20, "shoe_size": 44}, "k": 5})).json()
            assert "fallback" not in b
            got = {it["item_id"] for it in b["items"]}
            assert not got & {1, 2}, "inline history items must be excluded as seen"
            joined = " ".join(b["warnings"])
            assert "5000" in joined and "'x'" in joined and "shoe_size" in joined
            bad = await c.post("/v1/recall", json={"features": {"age": "old"}})
            assert bad.status_code == 422
            assert bad.json()["detail"][0]["loc"] == ["body", "features", "age"]

    asyncio.run(main())


@pytest.mark.parametrize("body, field", [
    ({"k": 0}, "k"), ({"k": 1001}, "k"), ({"k": "many"}, "k"),
    ({"history": list(range(201))}, "history"), ({"user_id": True}, "user_id"), ({"user_id": ""}, "user_id"),
    ({"exclude_seen": "perhaps"}, "exclude_seen"), ({"surprise": 1}, "surprise"),
    ({"history": [1.5]}, "history"),
])
def test_invalid_input_is_422_naming_the_field(artifacts, redis_url, redis_prefix, body, field):
    async def main() -> None:
        async with running(settings_for(artifacts, redis_url, redis_prefix)) as c:
            r = await c.post("/v1/recall", json=body)
            assert r.status_code == 422, r.text
            assert any(field in d["loc"] for d in r.json()["detail"]), r.text

    asyncio.run(main())


def test_size_limits_413_and_batch_bound(artifacts, redis_url, redis_prefix):
    async def main() -> None:
        s = settings_for(artifacts, redis_url, redis_prefix, max_body_bytes=2048, max_batch_users=4)
        async with running(s) as c:
            big = json.dumps({"history": ["x" * 100] * 50}).encode()
            r = await c.post("/v1/recall", content=big, headers={"content-type": "application/json"})
            assert r.status_code == 413 and "2048" in r.json()["detail"]

            async def chunks():  # no Content-Length: the streamed size is counted
                for i in range(0, len(big), 512):
                    yield big[i:i + 512]

            r = await c.post("/v1/recall", content=chunks(), headers={"content-type": "application/json"})
            assert r.status_code == 413
            r = await c.post("/v1/recall/batch", json={"requests": [{"k": 1}] * 5})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"][:2] == ["body", "requests"]

    asyncio.run(main())


def test_event_changes_the_very_next_recall(artifacts, redis_url, redis_prefix):
    async def main() -> None:
        async with running(settings_for(artifacts, redis_url, redis_prefix)) as c:
            before = (await c.post("/v1/recall", json={"user_id": 5, "k": 10})).json()
            assert (await c.post("/v1/recall", json={"user_id": 5, "k": 10})).json()["cached"] is True
            top = before["items"][0]["item_id"]
            ev = await c.post("/v1/events", json={"user_id": "5", "item_id": str(top)})
            assert ev.status_code == 200, ev.text
            assert ev.json()["item_id"] == top and ev.json()["events"] == 1
            after = (await c.post("/v1/recall", json={"user_id": 5, "k": 10})).json()
            assert after["cached"] is False
            assert top not in {it["item_id"] for it in after["items"]}, "the item just consumed came back"
            assert after["items"] != before["items"]
            # an unknown user with an event is no longer cold
            await c.post("/v1/events", json={"user_id": "fresh", "item_id": top})
            fresh = (await c.post("/v1/recall", json={"user_id": "fresh", "k": 5})).json()
            assert "fallback" not in fresh
            # an item outside the index is kept, with a warning; a non-integer id is 422
            w = (await c.post("/v1/events", json={"user_id": "fresh", "item_id": 123456})).json()
            assert w["warnings"]
            bad = await c.post("/v1/events", json={"user_id": "fresh", "item_id": "abc"})
            assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "item_id"]

    asyncio.run(main())


def test_batch_matches_single_recalls_and_similar_items(artifacts, redis_url, redis_prefix):
    async def main() -> None:
        async with running(settings_for(artifacts, redis_url, redis_prefix)) as c:
            reqs = [{"user_id": u, "k": 7} for u in (1, 2, "stranger")] + [{"history": [3, 4], "k": 3}]
            r = await c.post("/v1/recall/batch", json={"requests": reqs})
            assert r.status_code == 200, r.text
            res = r.json()["results"]
            assert len(res) == 4 and res[2]["fallback"] == "popular"
            for q, a in zip(reqs, res, strict=True):
                single = (await c.post("/v1/recall", json=q)).json()
                assert single["items"] == a["items"] and single["cached"] is True
            s = await c.get("/v1/items/10/similar", params={"k": 5})
            assert s.status_code == 200, s.text
            sim = s.json()
            assert sim["item_id"] == 10 and len(sim["items"]) == 5
            assert 10 not in {it["item_id"] for it in sim["items"]}
            assert (await c.get("/v1/items/424242/similar")).status_code == 404
            assert (await c.get("/v1/items/10/similar", params={"k": 0})).status_code == 422

    asyncio.run(main())


def test_string_item_catalogue_answers_with_string_ids(tmp_path, redis_url, redis_prefix):
    w = make_world(n_users=10, n_items=30, per_user=4, str_item_ids=True, seed=2)
    publish_bundle(tmp_path, w, make_model(w, seed=2))

    async def main() -> None:
        async with running(settings_for(tmp_path, redis_url, redis_prefix)) as c:
            a = (await c.post("/v1/recall", json={"history": ["sku-1", "sku-2"], "k": 5})).json()
            assert all(isinstance(it["item_id"], str) and it["item_id"].startswith("sku-") for it in a["items"])
            assert (await c.get("/v1/items/sku-3/similar", params={"k": 2})).json()["item_id"] == "sku-3"

    asyncio.run(main())


def test_ops_endpoints_metrics_request_id_and_openapi(artifacts, redis_url, redis_prefix):
    async def main() -> None:
        async with running(settings_for(artifacts, redis_url, redis_prefix, max_k=50, default_k=20)) as c:
            assert (await c.get("/healthz")).json() == {"status": "ok"}
            ready = (await c.get("/readyz")).json()
            assert ready["status"] == "ready" and ready["redis"] == "up"
            r = await c.post("/v1/recall", json={"k": 3}, headers={"X-Request-ID": "abc-123"})
            assert r.headers["x-request-id"] == "abc-123"
            assert len((await c.post("/v1/recall", json={"k": 3})).headers["x-request-id"]) == 32
            await c.post("/v1/recall", json={"k": 3})
            m = (await c.get("/metrics")).text
            assert 'tt_request_latency_seconds_count{method="POST",route="/v1/recall"}' in m
            assert 'tt_cache_lookups_total{result="hit"}' in m or 'tt_cache_lookups_total{result="hit_local"}' in m
            assert 'tt_bundle_info{index_version="20250101T000000Z-000001"' in m
            assert "tt_microbatch_size_bucket" in m
            spec = (await c.get("/openapi.json")).json()
            req = spec["components"]["schemas"]["RecallRequest"]["properties"]
            assert req["k"]["maximum"] == 50 and req["k"]["default"] == 20
            assert "/v1/recall/batch" in spec["paths"] and "/v1/events" in spec["paths"]

    asyncio.run(main())


def test_admin_reload_needs_the_token(artifacts, redis_url, redis_prefix, world, model):
    async def main() -> None:
        async with running(settings_for(artifacts, redis_url, redis_prefix)) as c:
            assert (await c.post("/v1/admin/reload")).status_code == 403  # no token configured
        async with running(settings_for(artifacts, redis_url, redis_prefix, admin_token="s3cret")) as c:
            assert (await c.post("/v1/admin/reload")).status_code == 401
            assert (await c.post("/v1/admin/reload", headers={"Authorization": "Bearer nope"})).status_code == 401
            publish_bundle(artifacts, world, model, index_version="20250101T000000Z-000002")
            ok = await c.post("/v1/admin/reload", headers={"Authorization": "Bearer s3cret"})
            assert ok.status_code == 200 and ok.json()["index_version"] == "20250101T000000Z-000002"
            # rollback to a named version
            rb = await c.post("/v1/admin/reload", headers={"Authorization": "Bearer s3cret"},
                              json={"index_version": "20250101T000000Z-000001"})
            assert rb.json() == {"changed": True, "model_version": "20250101T000000Z-aaaaaa",
                                 "index_version": "20250101T000000Z-000001"}
            assert (await c.post("/v1/recall", json={"k": 1})).json()["index_version"] == "20250101T000000Z-000001"

    asyncio.run(main())


def test_hot_reload_by_notice_and_by_polling(
        artifacts, redis_url, redis_prefix, world, model):
    async def version(c) -> str:
        return (await c.post("/v1/recall", json={"user_id": 1, "k": 3})).json()["index_version"]

    async def main() -> None:
        # pub/sub only (no polling)
        async with running(settings_for(artifacts, redis_url, redis_prefix)) as c:
            assert await version(c) == "20250101T000000Z-000001"
            # the notice is only heard once the server's listener has subscribed: wait for that event
            with redis.Redis.from_url(redis_url) as r:
                await eventually(lambda: r.pubsub_numsub(channel(redis_prefix))[0][1] >= 1)
            await asyncio.to_thread(publish_bundle, artifacts, world, model, index_version="20250101T000000Z-000002",
                                    redis_url=redis_url, prefix=redis_prefix)
            await eventually(lambda: _is(version(c), "20250101T000000Z-000002"))
        # polling only (no Redis at all)
        async with running(settings_for(artifacts, "", redis_prefix, reload_poll_s=0.1)) as c:
            assert await version(c) == "20250101T000000Z-000002"
            publish_bundle(artifacts, world, model, index_version="20250101T000000Z-000004")
            await eventually(lambda: _is(version(c), "20250101T000000Z-000004"))

    asyncio.run(main())


async def _is(coro, want: str) -> bool:
    return (await coro) == want


def test_corrupt_current_bundle_keeps_the_previous_one(artifacts, redis_url, redis_prefix, world, model):
    async def main() -> None:
        async with running(settings_for(artifacts, "", redis_prefix, reload_poll_s=0.05)) as c:
            assert (await c.post("/v1/recall", json={"k": 1})).json()["index_version"] == "20250101T000000Z-000001"
            # a bundle directory whose file no longer matches its manifest, made current by hand
            good = publish_bundle(artifacts / "elsewhere", world, model, index_version="20250101T000000Z-000009")
            import shutil
            target = artifacts / "bundles" / "20250101T000000Z-000009"
            shutil.copytree(good, target)
            (target / "model.pt").write_bytes(b"not a checkpoint")
            (artifacts / "bundles" / "CURRENT").write_text("20250101T000000Z-000009")
            await eventually(lambda: "last_bundle_error" in c.app.state.runtime.readiness()[1])
            r = await c.post("/v1/recall", json={"k": 1})
            assert r.status_code == 200 and r.json()["index_version"] == "20250101T000000Z-000001"
            ready = (await c.get("/readyz")).json()
            assert ready["status"] == "ready" and "000009" in ready["last_bundle_error"]

    asyncio.run(main())


def test_no_bundle_yet_is_503_until_one_is_published(tmp_path, redis_url, redis_prefix, world, model):
    async def main() -> None:
        async with running(settings_for(tmp_path, redis_url, redis_prefix, reload_poll_s=0.05)) as c:
            assert (await c.get("/readyz")).status_code == 503
            r = await c.post("/v1/recall", json={"k": 1})
            assert r.status_code == 503 and "reindex" in r.json()["detail"]
            publish_bundle(tmp_path, world, model, index_version="20250101T000000Z-000001")
            await eventually(lambda: _status(c, "/readyz", 200))
            assert (await c.post("/v1/recall", json={"k": 1})).status_code == 200

    asyncio.run(main())


async def _status(c, path: str, want: int) -> bool:
    return (await c.get(path)).status_code == want


def test_redis_down_serves_uncached_and_reports_degraded_then_recovers(artifacts, private_redis):
    async def main() -> None:
        s = settings_for(artifacts, private_redis.url, "tt-test", redis_retry_s=0.1, redis_retry_max_s=0.2)
        async with running(s) as c:
            assert (await c.post("/v1/recall", json={"user_id": 2, "k": 5})).json()["cached"] is False
            assert (await c.post("/v1/recall", json={"user_id": 2, "k": 5})).json()["cached"] is True
            private_redis.stop()
            # the first answers may still come from this process's memory until the outage is noticed
            # (at the latest by the once-a-second probe); after that, nothing is cached
            await eventually(lambda: _uncached(c, {"user_id": 2, "k": 5}), timeout=30)
            for body in ({"user_id": 2, "k": 5}, {"k": 5}, {"history": [1, 2], "k": 5}):
                r = await c.post("/v1/recall", json=body)
                assert r.status_code == 200 and r.json()["cached"] is False
            ready = (await c.get("/readyz")).json()
            assert ready["status"] == "degraded" and ready["redis"] == "down"
            ev = await c.post("/v1/events", json={"user_id": 2, "item_id": 1})
            assert ev.status_code == 503 and "NOT recorded" in ev.json()["detail"]
            private_redis.start()
            await eventually(lambda: _ready(c))
            await c.post("/v1/recall", json={"user_id": 2, "k": 5})
            assert (await c.post("/v1/recall", json={"user_id": 2, "k": 5})).json()["cached"] is True
            assert (await c.post("/v1/events", json={"user_id": 2, "item_id": 1})).status_code == 200

    asyncio.run(main())


async def _uncached(c, body) -> bool:
    r = await c.post("/v1/recall", json=body)
    assert r.status_code == 200
    return r.json()["cached"] is False


async def _ready(c) -> bool:
    return (await c.get("/readyz")).json()["status"] == "ready"


def test_no_redis_configured_uses_in_process_cache_and_events(artifacts):
    async def main() -> None:
        async with running(settings_for(artifacts, "", "tt")) as c:
            ready = (await c.get("/readyz")).json()
            assert ready["status"] == "ready" and ready["redis"] == "disabled" and ready["cache"] == "memory"
            a = (await c.post("/v1/recall", json={"user_id": 4, "k": 5})).json()
            assert (await c.post("/v1/recall", json={"user_id": 4, "k": 5})).json()["cached"] is True
            top = a["items"][0]["item_id"]
            assert (await c.post("/v1/events", json={"user_id": 4, "item_id": top})).status_code == 200
            b = (await c.post("/v1/recall", json={"user_id": 4, "k": 5})).json()
            assert b["cached"] is False and top not in {it["item_id"] for it in b["items"]}

    asyncio.run(main())


@pytest.mark.parametrize("microbatch", [True, False])
def test_concurrent_recalls_are_answered_correctly_with_and_without_microbatching(
        artifacts, redis_url, redis_prefix, microbatch):
    async def main() -> None:
        s = settings_for(artifacts, redis_url, redis_prefix, microbatch=microbatch, cache_ttl_s=0)
        async with running(s) as c:
            singles = [(await c.post("/v1/recall", json={"user_id": u, "k": 5})).json()["items"] for u in range(1, 21)]
            many = await asyncio.gather(*(c.post("/v1/recall", json={"user_id": u, "k": 5}) for u in range(1, 21)))
            for m, single in zip(many, singles, strict=True):
                # a batched forward may differ from a single one in the last float digits
                got = m.json()["items"]
                assert [i["item_id"] for i in got] == [i["item_id"] for i in single]
                assert all(abs(a["score"] - b["score"]) < 1e-4 for a, b in zip(got, single, strict=True))
            # every one of the 40 answers was computed once (no cache), in batches of one without
            # micro-batching; with it, possibly fewer batches, never a user lost or computed twice
            m = (await c.get("/metrics")).text
            stat = {k: float(v) for k, v in (line.split() for line in m.splitlines()
                                             if line.startswith(("tt_microbatch_size_count", "tt_microbatch_size_sum")))}
            assert stat["tt_microbatch_size_sum"] == 40, stat
            if microbatch:
                assert 1 <= stat["tt_microbatch_size_count"] <= 40, stat
            else:
                assert stat["tt_microbatch_size_count"] == 40, stat

    asyncio.run(main())


def test_an_event_posted_to_another_process_reaches_this_ones_memory_cache(artifacts, redis_url, redis_prefix):
    """Two service instances on one Redis (as two workers would be): A caches a user's answer in memory,
    the event goes to B, and A's next answers reflect it once the notice arrives (no TTL wait)."""
    async def main() -> None:
        s = settings_for(artifacts, redis_url, redis_prefix, local_cache_ttl_s=300)
        async with running(s) as a, running(s) as b:
            await eventually(lambda: a.app.state.runtime.cache.user_notices_live)
            first = (await a.post("/v1/recall", json={"user_id": 9, "k": 10})).json()
            assert (await a.post("/v1/recall", json={"user_id": 9, "k": 10})).json()["cached"] is True
            top = first["items"][0]["item_id"]
            assert (await b.post("/v1/events", json={"user_id": 9, "item_id": top})).status_code == 200

            async def reflected() -> bool:
                r = (await a.post("/v1/recall", json={"user_id": 9, "k": 10})).json()
                return top not in {i["item_id"] for i in r["items"]}

            await eventually(reflected, timeout=30)

    asyncio.run(main())
