"""Gateway settings (flags, env LLMESH_GATEWAY_*, defaults)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GatewaySettings:
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
    # The response cache service (host:port); empty = no cache.
    cache_url: str = ""
    # Deadline of a cache call (a lookup may also wait for an identical in-flight request, bounded by the cache).
    cache_timeout_s: float = 0.25
    # The limiter service (host:port) that admits requests and holds token budgets; empty = no quotas.
    limiter_url: str = ""
    # Deadline of a limiter call (the limiter bounds its own Redis calls far below this).
    limiter_timeout_s: float = 1.0
    # Prometheus /metrics on this port (0 = off).
    metrics_port: int = 0
    # Price per 1k tokens by variant, for the cost counter: "variant=price,...".
    prices_per_1k: str = "smollm2-135m-int8=0.0001,smollm2-135m=0.0002,gemma3-270m=0.0004"
    log_level: str = "info"
