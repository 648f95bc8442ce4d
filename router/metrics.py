"""The router's Prometheus metrics (llmesh/metrics.py conventions)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llmesh.metrics import LATENCY_BUCKETS
from llmesh.types import RouteInfo, RouteKind, Tier
from router.discovery import Member
from router.load import LoadTracker
from router.replicas import ReplicaPool


class ReplicaCollector(Collector):
    """Per-replica gauges read from the pool at scrape time: replicas found by DNS come and go, and a replica that
    left must leave the metrics too (a set_function gauge would report it forever)."""

    def __init__(self, pool: ReplicaPool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        healthy = GaugeMetricFamily(
            "llmesh_router_replica_healthy", "1 if the replica is in rotation", labels=["replica"]
        )
        outstanding = GaugeMetricFamily(
            "llmesh_router_replica_outstanding", "Requests in flight per replica", labels=["replica"]
        )
        fallback = GaugeMetricFamily(
            "llmesh_router_replica_fallback", "1 if the replica is another region's (used only when no local one can)",
            labels=["replica"],
        )  # fmt: skip
        for state in list(self._pool.states):
            healthy.add_metric([state.name], 1.0 if state.healthy else 0.0)
            outstanding.add_metric([state.name], float(state.outstanding))
            fallback.add_metric([state.name], 1.0 if state.fallback else 0.0)
        yield healthy
        yield outstanding
        yield fallback


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
        registry.register(ReplicaCollector(pool))
        self._variants = list(variants)
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

    # router/discovery.py's MembershipListener: replicas found by DNS are pod addresses that come and go; a replica
    # that left takes its series with it, so the metric's cardinality follows the pool, not its history.
    async def added(self, member: Member) -> None:
        pass

    async def removed(self, member: Member) -> None:
        for variant in self._variants:
            with contextlib.suppress(KeyError):  # a variant it never answered has no series
                self.ttft.remove(variant, member.url)
