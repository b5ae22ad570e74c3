"""Service settings: one pydantic-settings object read from ``TT_*`` environment variables.

Every default lives here. The CLI (`twotower serve`) only overrides a few of them (host, port,
artifacts, Redis URL, workers) by exporting the matching ``TT_*`` variable before uvicorn starts,
so multi-worker uvicorn (which re-imports the app in each process) sees the same values.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from towers.artifacts import DEFAULT_REDIS_PREFIX, DEFAULT_REDIS_URL


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TT_", extra="ignore", case_sensitive=False)

    # where models/ and bundles/ live; the service reads bundles/CURRENT
    artifacts: Path = Path("./artifacts")

    # Redis: result cache, per-user event history, reload notices. "" = no Redis at all
    # (in-process cache and in-process event store, single-process only).
    redis_url: str = DEFAULT_REDIS_URL
    # Redis Cluster: TT_REDIS_URL names any node, redis-py's cluster client finds the others and sends
    # each command to the node that owns its keys (a user's keys share a slot through hash tags)
    redis_cluster: bool = False
    # namespace of every key and channel, so several deployments (or tests) share one Redis
    redis_prefix: str = Field(default=DEFAULT_REDIS_PREFIX, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    # result-cache TTL; 0 disables the result cache (events still go to Redis)
    cache_ttl_s: int = Field(default=300, ge=0)
    # in-process copy of hot answers in front of Redis (seconds; 0 = off; see service/cache.py for
    # the cross-process guarantee) and its memory bound
    local_cache_ttl_s: float = Field(default=10.0, ge=0)
    local_cache_max_bytes: int = Field(default=64 << 20, ge=0)
    # a Redis call that takes longer than this counts as a failure (keeps a hung Redis off the hot path)
    redis_timeout_s: float = Field(default=0.25, gt=0)
    # after a Redis failure, skip Redis for this long before trying again (circuit breaker);
    # doubles on each consecutive failure up to redis_retry_max_s
    redis_retry_s: float = Field(default=0.5, gt=0)
    redis_retry_max_s: float = Field(default=5.0, gt=0)

    # request bounds (documented in the OpenAPI schema)
    default_k: int = Field(default=100, ge=1)
    max_k: int = Field(default=1000, ge=1)
    max_history: int = Field(default=200, ge=1)
    max_exclude_ids: int = Field(default=1000, ge=0)
    max_features: int = Field(default=64, ge=0)
    max_batch_users: int = Field(default=256, ge=1)
    max_body_bytes: int = Field(default=1_000_000, ge=1024)

    # per-user event history in Redis (newest events feed the tower; all of them count as seen)
    events_cap: int = Field(default=500, ge=1)
    events_ttl_s: int = Field(default=90 * 24 * 3600, ge=0)  # 0 = keep forever

    # micro-batching of concurrent recalls into one tower forward + one index search
    microbatch: bool = True
    microbatch_max_size: int = Field(default=64, ge=1)
    microbatch_max_wait_ms: float = Field(default=2.0, ge=0)
    # threads running the tower forward + index search off the event loop; 0 = on the loop itself,
    # which costs less CPU per request (no GIL hand-offs, see service/batching.py). A thread helps
    # when batches are large and cached answers must not wait behind them.
    compute_threads: int = Field(default=0, ge=0)
    # intra-op threads for torch and OpenMP threads for faiss inside one compute call (0 = library default)
    torch_threads: int = Field(default=1, ge=0)

    # hot reload: poll bundles/CURRENT this often (seconds; 0 = no polling) besides pub/sub notices
    reload_poll_s: float = Field(default=5.0, ge=0)
    # bearer token for /v1/admin/*; empty = admin endpoints disabled
    admin_token: SecretStr = SecretStr("")

    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: str = "INFO"
    # one JSON access line per request (with request id and latency)
    access_log: bool = True
    # answer well-formed POST /v1/recall without FastAPI's routing and dependency machinery (same
    # parsing, model and answer; anything else still goes through FastAPI; see service/fastpath.py)
    fast_path: bool = True
    # FastAPI's native OpenTelemetry traces/metrics/logs, through the globally configured providers
    # (opentelemetry-sdk and an exporter are yours to install and configure)
    otel: bool = False
    workers: int = Field(default=1, ge=1)
    # `twotower serve` restarts itself once with glibc's malloc asking for transparent huge pages for
    # large allocations (Linux, glibc >= 2.35, THP in "madvise" mode); see service/cli.py
    hugepages: bool = True
    # seconds uvicorn waits for in-flight requests on SIGTERM
    graceful_timeout_s: float = Field(default=10.0, ge=0)

    @field_validator("log_level")
    @classmethod
    def _upper(cls, v: str) -> str:
        v = v.upper()
        if v not in ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"):
            raise ValueError(f"log level must be one of CRITICAL, ERROR, WARNING, INFO, DEBUG, not {v!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_k > self.max_k:
            raise ValueError(f"TT_DEFAULT_K ({self.default_k}) is larger than TT_MAX_K ({self.max_k})")
        return self

    @property
    def redis_enabled(self) -> bool:
        return bool(self.redis_url.strip())
