"""TT_REDIS_CLUSTER=true against a real 3-node Redis Cluster (started by the ``redis_cluster_url``
fixture): the same answers and the same cache behaviour as on one Redis node, keys spread over the
nodes with each user's keys on one, and events and bundle notices reaching every replica."""

from __future__ import annotations

import asyncio
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.factories import make_model, make_world, publish_bundle
from tests.service.helpers import eventually, running, settings_for


@pytest.fixture(scope="module")
def world():
    return make_world(n_users=30, n_items=100, per_user=6, seed=5)


@pytest.fixture
def artifacts(tmp_path: Path, world) -> Path:
    publish_bundle(tmp_path, world, make_model(world, seed=5), index_version="20250101T000000Z-0000c1")
    return tmp_path


@pytest.fixture
def cluster_prefix(redis_cluster_url: str):
    prefix = f"tt-test-{uuid.uuid4().hex[:8]}"
    yield prefix
    rc = redis.RedisCluster.from_url(redis_cluster_url)
    try:
        for node in rc.get_primaries():
            r = rc.get_redis_connection(node)
            keys = list(r.scan_iter(match=f"{prefix}*", count=500))
            for k in keys:
                r.delete(k)
    finally:
        rc.close()


def _cache_counts(metrics: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^tt_cache_lookups_total\{result="(\w+)"\} (\S+)$', metrics, re.M)}


async def _session(c: Any, users: list[str], items: list[Any]) -> list[tuple[int, bytes]]:
    """The same traffic for both deployments: recalls (asked twice), an event that changes the next
    answer, a batch, an anonymous history, similar items."""
    out: list[tuple[int, bytes]] = []

    async def keep(r: Any) -> None:
        out.append((r.status_code, r.content))

    for _ in range(2):
        for u in users:
            await keep(await c.post("/v1/recall", json={"user_id": u, "k": 8}))
    first = (await c.post("/v1/recall", json={"user_id": users[0], "k": 8})).json()
    await keep(await c.post("/v1/events", json={"user_id": users[0], "item_id": first["items"][0]["item_id"],
                                                "timestamp": 1_700_000_000}))
    for _ in range(2):
        await keep(await c.post("/v1/recall", json={"user_id": users[0], "k": 8}))
        await keep(await c.post("/v1/recall/batch", json={"requests": [{"user_id": u, "k": 4} for u in users[:3]]}))
        await keep(await c.post("/v1/recall", json={"history": items[:3], "k": 5}))
        await keep(await c.get(f"/v1/items/{items[5]}/similar", params={"k": 4}))
    return out


def test_a_cluster_gives_the_same_answers_and_cache_hits_as_one_node(artifacts, world, redis_url, redis_prefix,
                                                                      redis_cluster_url, cluster_prefix):
    users = sorted(world.users.index)[:5]
    items = list(world.items.index)

    async def main() -> dict[str, Any]:
        got: dict[str, Any] = {}
        for name, url, prefix, cluster in (("one node", redis_url, redis_prefix, False),
                                           ("cluster", redis_cluster_url, cluster_prefix, True)):
            # no in-process tier: every cache hit is a Redis read, so the cluster does the work
            s = settings_for(artifacts, url, prefix, redis_cluster=cluster, local_cache_ttl_s=0)
            async with running(s) as c:
                ready = (await c.get("/readyz")).json()
                assert ready["redis"] == "up" and ready["cache"] == "redis", (name, ready)
                answers = await _session(c, users, items)
                got[name] = (answers, _cache_counts((await c.get("/metrics")).text))
        return got

    got = asyncio.run(main())
    (one, one_counts), (cl, cl_counts) = got["one node"], got["cluster"]
    assert all(status == 200 for status, _ in one), one
    assert cl == one, "the cluster answered differently from one node"
    assert cl_counts == one_counts and one_counts.get("hit", 0) >= 10, (cl_counts, one_counts)

    # the keys really are spread over the cluster, and each user's keys (events, counter, cached
    # answers) sit on one node, as the scripts and the cache lookup need
    rc = redis.RedisCluster.from_url(redis_cluster_url)
    try:
        per_node = {n.name: [k.decode() for k in rc.get_redis_connection(n).scan_iter(match=f"{cluster_prefix}*")]
                    for n in rc.get_primaries()}
    finally:
        rc.close()
    assert sum(1 for keys in per_node.values() if keys) >= 2, per_node
    tag = f"{{{users[0]}}}"
    holders = [n for n, keys in per_node.items() if any(tag in k for k in keys)]
    assert len(holders) == 1, f"{users[0]}'s keys are on {holders}"
    assert {k.split(":")[2] for k in per_node[holders[0]] if tag in k} >= {"events", "seen", "evseq", "rec"}


def test_events_and_bundle_notices_reach_every_replica_through_the_cluster(artifacts, world, redis_cluster_url,
                                                                         cluster_prefix):
    """Two replicas on the cluster, each answering hot users from memory: an event posted to one
    changes the other's next answer, and a bundle published with a notice on another node of the
    cluster reaches both (polling off, so only the notice can do it)."""
    user = sorted(world.users.index)[1]

    async def main() -> None:
        s = settings_for(artifacts, redis_cluster_url, cluster_prefix, redis_cluster=True, local_cache_ttl_s=300)
        async with running(s) as a, running(s) as b:
            for c in (a, b):
                await eventually(lambda c=c: c.app.state.runtime.cache.user_notices_live)
            first = (await a.post("/v1/recall", json={"user_id": user, "k": 10})).json()
            assert (await a.post("/v1/recall", json={"user_id": user, "k": 10})).json()["cached"] is True
            top = first["items"][0]["item_id"]
            assert (await b.post("/v1/events", json={"user_id": user, "item_id": top})).status_code == 200

            async def reflected() -> bool:
                r = (await a.post("/v1/recall", json={"user_id": user, "k": 10})).json()
                return top not in {i["item_id"] for i in r["items"]}

            await eventually(reflected, timeout=5)

            rc = redis.RedisCluster.from_url(redis_cluster_url)
            try:
                other = [n for n in rc.get_primaries() if f"redis://{n.host}:{n.port}" not in redis_cluster_url][0]
            finally:
                rc.close()
            await asyncio.to_thread(publish_bundle, artifacts, world, make_model(world, seed=6),
                                    index_version="20250101T000000Z-0000c2", model_version="20250101T000000Z-bbbbbb",
                                    redis_url=f"redis://{other.host}:{other.port}/0", prefix=cluster_prefix)

            async def swapped() -> bool:
                versions = [(await c.post("/v1/recall", json={"k": 3})).json()["index_version"] for c in (a, b)]
                return versions == ["20250101T000000Z-0000c2"] * 2

            await eventually(swapped, timeout=10)

    asyncio.run(main())
