"""Gateway settings (flags, env LLMESH_GATEWAY_*, defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from llmesh.redis_auth import RedisAuthSettings
from llmesh.tls import TlsSettings


@dataclass(frozen=True)
class GatewaySettings(RedisAuthSettings, TlsSettings):
    host: str = "127.0.0.1"
    port: int = 50051
    router_url: str = "127.0.0.1:50052"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Used when a request gives no max_tokens.
    default_max_tokens: int = 256
    # Requests asking for more are refused with INVALID_ARGUMENT, not silently clipped.
    max_tokens_limit: int = 1024
    max_messages: int = 256
    # Sum of all message contents, in characters; the router checks the token count against the context.
    max_prompt_chars: int = 200_000
    # Each short string a caller sends (model, user, a message's name, a stop string), in characters.
    max_field_chars: int = 256
    # The OpenAI JSON body of POST /v1/chat/completions: its size, and how deeply it may nest (Envoy's own body
    # limit applies first at the edge).
    max_body_bytes: int = 4 * 1024 * 1024
    max_json_depth: int = 32
    # Most choices one request may ask for (OpenAI's `n`): each is generated in full and reserved against the
    # caller's token budget (prompt + n * max_tokens).
    max_n: int = 4
    # A tool's parameters schema or a response_format JSON schema (and a tool's description), in characters of
    # JSON text.
    max_schema_chars: int = 64 * 1024
    # The response cache service (host:port); empty = no cache.
    cache_url: str = ""
    # Deadline of a cache call (a lookup may also wait for an identical in-flight request, bounded by the cache).
    cache_timeout_s: float = 0.25
    # The limiter service (host:port) that admits requests and holds token budgets; empty = no quotas.
    limiter_url: str = ""
    # Deadline of a limiter call (the limiter bounds its own Redis calls far below this).
    limiter_timeout_s: float = 1.0
    # On SIGTERM: in-flight requests get shutdown_grace_s to finish, then up to shutdown_drain_s more is spent
    # settling their quota reservations, releasing unanswered ones and storing finished answers. Together below the
    # launcher's 10 s before SIGKILL.
    shutdown_grace_s: float = 6.0
    shutdown_drain_s: float = 3.0
    # Time budgets against a hung (stopped, wedged) dependency, llmesh/budgets.py: a call unanswered after half the
    # budget is followed by a health check; if that is unanswered for the other half too, the dependency counts as
    # hung and is skipped for dependency_cooldown_s (then one request tries it again). A live dependency that is
    # merely slow is waited for, up to the deadlines above. What a hung dependency means for a request: the cache
    # is bypassed; the limiter's outage policy below applies; a hung router fails the request with UNAVAILABLE.
    cache_hang_budget_s: float = 0.2
    limiter_hang_budget_s: float = 0.1
    router_hang_budget_s: float = 2.0
    dependency_cooldown_s: float = 1.0
    # While the limiter does not answer (hung or unreachable), requests of these tiers are admitted without a quota
    # check (fail open) after limiter_hang_budget_s; the other tiers are refused with UNAVAILABLE (fail closed) once
    # the limiter has also left a health check unanswered for limiter_timeout_s (a busy limiter is not refused on).
    # Comma-separated tier names; keep it in line with on_store_failure in limiter_service/policy.toml.
    limiter_fail_open_tiers: str = "paid,enterprise"
    # How long a key's request-rate or token-budget refusal is remembered (at most its Retry-After), so its next
    # requests are refused before the router tokenizes them (gateway/admission.py); 0 = ask the limiter every time.
    quota_refusal_memory_s: float = 1.0
    # API key lookups are cached (gateway/auth.py): a record is re-read after key_cache_ttl_s (so a revoked key
    # stops working within it), "no such key" after key_cache_negative_ttl_s. While Redis fails, keys read within
    # key_cache_max_stale_s keep working; after a failed read Redis is left alone for key_store_retry_s.
    key_cache_ttl_s: float = 10.0
    key_cache_negative_ttl_s: float = 2.0
    key_cache_max_stale_s: float = 300.0
    key_cache_max_entries: int = 10_000
    key_store_retry_s: float = 1.0
    # A key's last_used is written in the background at most this often per key and gateway.
    key_last_used_interval_s: float = 60.0
    # Prometheus /metrics on this port (0 = off).
    metrics_port: int = 0
    # Price per 1k tokens by variant, for the cost counter: "variant=price,...". The defaults are router/policy.toml's
    # (proportional to parameters: 0.001 per billion per 1k tokens); keep the two in step when changing either.
    prices_per_1k: str = (
        "smollm2-135m-int8=0.0001345,smollm2-135m=0.0001345,gemma3-270m=0.000268,"
        "qwen2.5-coder-0.5b=0.000494,qwen2.5-coder-1.5b=0.00154"
    )
    log_level: str = "info"
