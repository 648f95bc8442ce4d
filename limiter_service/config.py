"""Limiter settings (flags, env LLMESH_LIMITER_*, defaults). Limits themselves live in the policy file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmesh.redis_auth import RedisAuthSettings
from llmesh.tls import TlsSettings


@dataclass(frozen=True)
class LimiterSettings(RedisAuthSettings, TlsSettings):
    host: str = "127.0.0.1"
    port: int = 50053
    # Prometheus /metrics; 0 = off.
    metrics_port: int = 9103
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Talk to a Redis Cluster (redis_url names any one node).
    redis_cluster: bool = False
    # The quota policy (TOML); empty = the default shipped in limiter_service/policy.toml. Re-read when it changes.
    policy_file: Path | None = None
    policy_reload_s: float = 1.0
    # Each Redis call is abandoned after this long: an outage costs milliseconds, not seconds.
    redis_timeout_s: float = 0.1
    # Consecutive Redis failures that open the circuit; while open, decisions skip Redis entirely.
    breaker_failures: int = 3
    # While open, Redis is pinged this often; the first answer closes the circuit.
    breaker_probe_s: float = 0.25
    # An admitted request holds its concurrency slot at most this long if it is never settled (its gateway
    # died); its tokens stay charged in full. Above the gateway's longest request.
    lease_s: float = 600.0
    log_level: str = "info"
    # On SIGTERM: NOT_SERVING at once, then reservations and settlements in flight get this long to finish.
    shutdown_grace_s: float = 5.0
