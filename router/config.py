"""Router settings (flags, env LLMESH_ROUTER_*, defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RouterSettings:
    host: str = "127.0.0.1"
    port: int = 50052
    # Triton's gRPC endpoint.
    triton_url: str = "127.0.0.1:8001"
    # The Triton model repository; the router reads each variant's tokenizer and metadata from it.
    model_repository: Path | None = None
    # Variant chosen for `model: auto` when the policy names none; empty = the first variant found.
    default_variant: str = ""
    # Upper bound on one generation, end to end.
    generate_timeout_s: float = 300.0
    log_level: str = "info"
