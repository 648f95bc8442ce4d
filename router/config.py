"""Router settings (flags, env LLMESH_ROUTER_*, defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmesh.minilm import EMBEDDING_MODEL
from llmesh.tls import TlsSettings
from router.policy import DEFAULT_POLICY_FILE


@dataclass(frozen=True)
class RouterSettings(TlsSettings):
    host: str = "127.0.0.1"
    port: int = 50052
    # Triton gRPC endpoints serving the same model repository, comma-separated (the replicas).
    triton_url: str = "127.0.0.1:8001"
    # Replicas reserved for the enterprise tier, comma-separated; enterprise spills onto the shared ones.
    dedicated_triton_url: str = ""
    # The Triton model repository; the router reads each variant's tokenizer and metadata from it.
    model_repository: Path | None = None
    policy_file: Path = DEFAULT_POLICY_FILE
    # Overrides every tier's default variant (empty = the policy file's defaults).
    default_variant: str = ""
    # Upper bound on one generation, end to end.
    generate_timeout_s: float = 300.0
    # A Triton stream silent for half this is followed by a ServerLive check; a replica that leaves that unanswered
    # for the other half too is hung, and the request fails over (llmesh/budgets.py). Generous: a false verdict
    # under heavy load fails a request over and counts against the replica's health.
    triton_hang_budget_s: float = 10.0
    # Active health checks of every replica; a failing replica is ejected until a check passes again.
    health_interval_s: float = 1.0
    metrics_port: int = 0
    log_level: str = "info"
    # Use the same files on the Triton hop (tritonserver --grpc-use-ssl-mutual). `llmesh up` turns it on for the
    # tritonservers it starts; an external Triton is reached as configured here.
    triton_tls: bool = False
    # The Triton model serving Embed (triton_models/embedding_model.py); used when the model repository holds it,
    # "" = no embeddings. Upper bound on one Embed call's Triton request.
    embedding_model: str = EMBEDDING_MODEL
    embed_timeout_s: float = 30.0

    def replica_urls(self) -> tuple[list[str], list[str]]:
        def split(value: str) -> list[str]:
            return [u.strip() for u in value.split(",") if u.strip()]

        return split(self.triton_url), split(self.dedicated_triton_url)
