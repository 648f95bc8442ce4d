"""The limiter's Prometheus metrics (llmesh/metrics.py conventions: one registry per service, passed in)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# A check is one Redis round trip (well under a millisecond) or, with the circuit open, no round trip at all.
CHECK_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class LimiterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "llmesh_limiter_decisions_total",
            "Quota decisions. limit: the limit that refused (none when allowed); store: redis or local.",
            ["tier", "limit", "result", "store"],
            registry=registry,
        )
        self.check_seconds = Histogram(
            "llmesh_limiter_check_seconds",
            "Time to decide one check, store round trip included.",
            ["operation"],
            buckets=CHECK_BUCKETS,
            registry=registry,
        )
        self.redis_degraded = Gauge(
            "llmesh_limiter_redis_degraded",
            "1 while Redis is unreachable and the circuit is open (decisions follow each tier's on_store_failure).",
            registry=registry,
        )
        self.redis_errors = Counter(
            "llmesh_limiter_redis_errors_total", "Failed or timed-out Redis calls.", registry=registry
        )
        self.stall_retries = Counter(
            "llmesh_limiter_stall_retries_total",
            "Redis calls retried because they failed while this process's event loop was stalled (not counted as "
            "Redis failures).",
            registry=registry,
        )
        self.settlements_pending = Gauge(
            "llmesh_limiter_settlements_pending",
            "Settlements waiting for Redis to come back (their reservations stay charged in full meanwhile).",
            registry=registry,
        )
        self.releases = Counter(
            "llmesh_limiter_releases_total",
            "Reservations given back because their outcome was unknown to the caller (a timed-out or cancelled "
            "Reserve, a gateway shutting down); origin: gateway (Release calls) or limiter (its own Redis call "
            "timed out); result: released (an admitted use was undone), none (nothing had been admitted), queued.",
            ["origin", "result"],
            registry=registry,
        )
        self.releases_pending = Gauge(
            "llmesh_limiter_releases_pending",
            "Releases waiting for Redis to come back.",
            registry=registry,
        )
        self.policy_reloads = Counter(
            "llmesh_limiter_policy_reloads_total",
            "Policy file changes seen; result: applied or refused (the previous policy stays).",
            ["result"],
            registry=registry,
        )
