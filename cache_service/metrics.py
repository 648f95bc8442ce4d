"""The cache's Prometheus metrics (llmesh.metrics conventions: one registry passed in, llmesh_cache_* names)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llmesh.metrics import LATENCY_BUCKETS


class CacheMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.hits = Counter(
            "llmesh_cache_hits_total",
            "Lookups answered from the cache",
            ["layer", "tier", "variant"],
            registry=registry,
        )
        self.misses = Counter(
            "llmesh_cache_misses_total",
            "Lookups a layer could not answer (semantic counts only requests it was asked about)",
            ["layer", "tier", "variant"],
            registry=registry,
        )
        self.bypassed = Counter(
            "llmesh_cache_bypassed_total",
            "Requests the cache stayed out of: not_deterministic, backend_down",
            ["reason"],
            registry=registry,
        )
        self.tokens_saved = Counter(
            "llmesh_cache_tokens_saved_total",
            "Tokens served from the cache instead of being processed or generated",
            ["kind", "tier", "variant"],
            registry=registry,
        )
        self.cost_saved = Counter(
            "llmesh_cache_cost_saved_total",
            "Notional cost of the tokens saved, at the configured prices per million tokens",
            ["tier", "variant"],
            registry=registry,
        )
        self.lookup_seconds = Histogram(
            "llmesh_cache_lookup_seconds",
            "Lookup latency inside the cache service, by outcome (hit_exact, hit_semantic, miss, waited, bypass)",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.stores = Counter(
            "llmesh_cache_stores_total",
            "Store calls by result: stored, released (no answer), skipped, failed",
            ["result"],
            registry=registry,
        )
        self.evictions = Counter(
            "llmesh_cache_evictions_total", "Entries evicted to stay under max_bytes", registry=registry
        )
        self.single_flight = Counter(
            "llmesh_cache_single_flight_total",
            "Identical concurrent misses: leader (generates), served (waited, got the answer), "
            "fell_through (leader failed or took too long)",
            ["outcome"],
            registry=registry,
        )
        self.backend_errors = Counter(
            "llmesh_cache_backend_errors_total",
            "Failed Redis calls; op: lookup, store or probe",
            ["op"],
            registry=registry,
        )
        self.backend_up = Gauge(
            "llmesh_cache_backend_up", "1 while Redis answers, 0 while the cache is bypassed", registry=registry
        )
        self.backend_up.set(1)
        self.embed_seconds = Histogram(
            "llmesh_cache_embed_seconds",
            "Time to embed one batch of questions",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.embed_batch = Histogram(
            "llmesh_cache_embed_batch_size",
            "Questions per embedding batch",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=registry,
        )
