"""The router's Prometheus metrics (llmesh/metrics.py conventions)."""

from __future__ import annotations

import functools

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llmesh.metrics import LATENCY_BUCKETS
from llmesh.types import RouteInfo, RouteKind, Tier
from router.load import LoadTracker
from router.replicas import ReplicaPool, ReplicaState


def _healthy(state: ReplicaState) -> float:
    return 1.0 if state.healthy else 0.0


def _outstanding(state: ReplicaState) -> float:
    return float(state.outstanding)


# The `reason` label: low cardinality, stable for dashboards and alerts (docs/OPERATIONS.md).
REASON_LABELS = {
    RouteKind.TIER_DEFAULT: "default",
    RouteKind.PINNED: "pinned",
    RouteKind.COMPLEXITY_UP: "complexity",
    RouteKind.COMPLEXITY_DOWN: "complexity",
    RouteKind.LOAD_SHED: "load",
    RouteKind.FALLBACK: "fallback",
    RouteKind.CACHE_HIT: "cache",
}


class PrometheusObserver:
    def __init__(self, registry: CollectorRegistry, pool: ReplicaPool, load: LoadTracker, variants: list[str]) -> None:
        self.decisions = Counter(
            "llmesh_router_decisions_total", "Requests routed, by the deciding factor",
            ["tier", "variant", "reason"], registry=registry,
        )  # fmt: skip
        self.failovers = Counter(
            "llmesh_router_failovers_total", "Retries on another replica or a smaller variant before the first token",
            ["variant", "kind"], registry=registry,
        )  # fmt: skip
        self.ttft = Histogram(
            "llmesh_router_ttft_seconds", "Time from sending a request to Triton to its first token",
            ["variant", "replica"], buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        healthy = Gauge(
            "llmesh_router_replica_healthy", "1 if the replica is in rotation", ["replica"], registry=registry
        )
        outstanding = Gauge(
            "llmesh_router_replica_outstanding", "Requests in flight per replica", ["replica"], registry=registry
        )
        for state in pool.states:
            healthy.labels(state.name).set_function(functools.partial(_healthy, state))
            outstanding.labels(state.name).set_function(functools.partial(_outstanding, state))
        in_flight = Gauge("llmesh_router_in_flight", "Requests in flight per variant", ["variant"], registry=registry)
        p95 = Gauge(
            "llmesh_router_ttft_p95_seconds", "Recent first-token p95 the policy reads", ["variant"], registry=registry
        )
        for variant in variants:
            in_flight.labels(variant).set_function(functools.partial(load.in_flight, variant))
            p95.labels(variant).set_function(functools.partial(load.ttft_p95, variant))

    def routed(self, tier: Tier, route: RouteInfo) -> None:
        self.decisions.labels(tier.value, route.variant, REASON_LABELS[route.kind]).inc()

    def failover(self, variant: str, replica: str, kind: str) -> None:
        self.failovers.labels(variant, kind).inc()

    def first_token(self, variant: str, replica: str, seconds: float) -> None:
        self.ttft.labels(variant, replica).observe(seconds)
