"""Cache service settings (flags, env LLMESH_CACHE_*, defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from llmesh.redis_auth import RedisAuthSettings
from llmesh.tls import TlsSettings


@dataclass(frozen=True)
class CacheSettings(RedisAuthSettings, TlsSettings):
    host: str = "127.0.0.1"
    port: int = 50054
    # Prometheus /metrics (llmesh.metrics conventions); 0 = off.
    metrics_port: int = 9104
    # The cache's own Redis. It may be the key store's Redis; a separate one keeps a cache outage (or its memory
    # pressure) away from authentication.
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Per Redis call. Short on purpose: a slow or dead Redis must cost a request milliseconds, not seconds.
    redis_timeout_s: float = 0.2
    # After a Redis failure the cache is bypassed (every lookup a miss, stores dropped) for this long, then one
    # call probes Redis again (circuit breaker).
    breaker_cooldown_s: float = 2.0
    # How long an entry lives.
    ttl_s: float = 3600.0
    # Memory bound for the entries of this cache (bytes of keys + values + bookkeeping, as counted here).
    # Past it, the least recently used entries are evicted, independent of Redis' own maxmemory-policy.
    max_bytes: int = 256 * 1024 * 1024
    # Answers larger than this are not stored.
    max_entry_bytes: int = 1024 * 1024
    # By default only deterministic requests are cached: temperature 0 (greedy) or an explicit seed.
    cache_sampled: bool = False
    # Entries are scoped to the API key that created them. Requests of these key ids (comma-separated) and of
    # these tiers (comma-separated, e.g. "free") share one public scope instead.
    public_key_ids: str = ""
    public_tiers: str = ""
    # Single flight: identical concurrent misses wait for the first one's answer instead of generating it again.
    single_flight: bool = True
    # Longest a waiter waits for the leader's answer before generating itself.
    single_flight_wait_s: float = 30.0
    # A leader that vanished without releasing its lock blocks nobody for longer than this.
    single_flight_lease_s: float = 60.0
    # Semantic layer: cosine similarity of the final user turn's all-MiniLM-L6-v2 embedding (plus a lexical guard,
    # semantic.py). 0 = off. 0.93: the lowest threshold with no false hit on the calibration half of
    # cache_service/data/question_pairs.jsonl; the table is in docs/PERFORMANCE.md ("Cache").
    semantic_threshold: float = 0.93
    # Longer user turns skip the semantic layer: the embedding sees only the first 256 tokens, and long prompts
    # that differ late would look identical.
    semantic_max_chars: int = 512
    # Most entries per semantic bucket (scope + variant + system prompt + sampling); older ones drop out.
    semantic_max_entries: int = 2000
    # Embeddings in one batch, and how long the first request of a batch waits for others.
    embed_max_batch: int = 32
    embed_max_delay_s: float = 0.002
    # onnxruntime threads of the MiniLM graph (they do not spin, so idle ones cost Triton nothing).
    embed_threads: int = 2
    # Notional prices for the "cost saved" metric, per million tokens.
    price_per_million_prompt_tokens: float = 0.15
    price_per_million_completion_tokens: float = 0.60
    log_level: str = "info"
    # On SIGTERM: NOT_SERVING at once, then cache lookups and stores in flight get this long to finish.
    shutdown_grace_s: float = 10.0
