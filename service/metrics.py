"""Prometheus metrics, one registry per app (two apps in one process, as in tests, never collide)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Latency buckets aimed at a service whose p99 target is 10 ms: fine below 20 ms, coarse above.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class Metrics:
    registry: CollectorRegistry
    latency: Histogram
    requests: Counter
    cache: Counter
    batch_size: Histogram
    compute_latency: Histogram
    bundle_info: Gauge
    reloads: Counter
    redis_up: Gauge
    fallbacks: Counter
    events: Counter

    @classmethod
    def create(cls) -> Metrics:
        r = CollectorRegistry(auto_describe=True)
        return cls(
            registry=r,
            latency=Histogram("tt_request_latency_seconds", "HTTP request latency by route template",
                              ["route", "method"], buckets=_LATENCY_BUCKETS, registry=r),
            requests=Counter("tt_requests", "HTTP requests by route template and status code",
                             ["route", "method", "status"], registry=r),
            cache=Counter("tt_cache_lookups", "Result-cache lookups: hit, miss, shared (joined an identical "
                          "in-flight computation), bypass (cache unavailable or disabled)", ["result"], registry=r),
            batch_size=Histogram("tt_microbatch_size", "Users per tower forward / index search",
                                 buckets=_BATCH_BUCKETS, registry=r),
            compute_latency=Histogram("tt_compute_seconds", "Tower forward + index search time per batch",
                                      buckets=_LATENCY_BUCKETS, registry=r),
            bundle_info=Gauge("tt_bundle_info", "The bundle being served (value 1)",
                              ["model_version", "index_version"], registry=r),
            reloads=Counter("tt_bundle_reloads", "Bundle load attempts by result", ["result"], registry=r),
            redis_up=Gauge("tt_redis_up", "1 when Redis answers, 0 when the service runs without it",
                           registry=r),
            fallbacks=Counter("tt_popular_fallbacks", "Recalls answered from the popularity list", registry=r),
            events=Counter("tt_events", "POST /v1/events by result", ["result"], registry=r),
        )

    def set_bundle(self, model_version: str, index_version: str) -> None:
        self.bundle_info.clear()
        self.bundle_info.labels(model_version=model_version, index_version=index_version).set(1)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
