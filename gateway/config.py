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
    log_level: str = "info"
