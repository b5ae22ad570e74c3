"""One Redis pub/sub subscription for the notices this process reacts to:

- ``<prefix>:bundles`` (written by the reindex job, ``index.bundle.notify``): a bundle was published;
- ``<prefix>:v1:events`` (written by ``service.events`` right after the event, in the same round trip): a
  user's history changed, so this process drops its in-memory answers for that user.

The subscription reconnects with backoff while Redis is away and reports its state, because a
process that may have missed notices must not trust what they would have invalidated.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

log = logging.getLogger(__name__)

Handler = Callable[[bytes], Awaitable[None] | None]


async def listen(redis_url: str, handlers: dict[str, Handler], *, on_state: Callable[[bool], None],
                 stopped: Callable[[], bool], connect_timeout_s: float = 1.0, cluster: bool = False) -> None:
    """Subscribe to ``handlers``' channels and call the handler of each message, until ``stopped()``.

    ``cluster``: ``redis_url`` names a node of a Redis Cluster. Pub/sub there is cluster-wide (a
    message published on any node reaches subscribers on every node), so redis-py's cluster client
    subscribes through one node of its choosing, and after a failure through whichever its refreshed
    slot map names."""
    client: Any = (RedisCluster.from_url(redis_url, socket_connect_timeout=connect_timeout_s) if cluster
                   else aioredis.Redis.from_url(redis_url, socket_connect_timeout=connect_timeout_s))
    backoff = 0.2
    try:
        while not stopped():
            connected = False
            ps = client.pubsub(ignore_subscribe_messages=True)
            try:
                if cluster:
                    await client.initialize()  # the slot map, which picks the node to subscribe through
                await ps.subscribe(*handlers)
                connected = True
                backoff = 0.2
                on_state(True)
                # redis-py's read can swallow a cancellation, so the loop also checks ``stopped``
                while not stopped():
                    msg = await ps.get_message(timeout=0.5)
                    if msg is None or msg.get("type") != "message":
                        continue
                    ch = msg["channel"].decode() if isinstance(msg["channel"], bytes) else str(msg["channel"])
                    handler = handlers.get(ch)
                    if handler is None:
                        continue
                    try:
                        res = handler(msg["data"])
                        if asyncio.iscoroutine(res):
                            await res
                    except Exception:  # a bad message must not end the subscription
                        log.exception("notice handler failed", extra={"channel": ch})
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("notice channel unavailable: %s", exc)
                if not stopped():
                    await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if connected:
                    on_state(False)
                try:
                    await ps.aclose()
                except Exception:  # the connection may already be broken
                    pass
    finally:
        try:
            await client.aclose()
        except Exception:  # the connection may already be broken
            pass
