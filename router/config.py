"""Router settings (flags, env LLMESH_ROUTER_*, defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmesh.minilm import EMBEDDING_MODEL
from llmesh.tls import TlsSettings
from router.discovery import ReplicaGroup, parse_names
from router.policy import DEFAULT_POLICY_FILE


@dataclass(frozen=True)
class RouterSettings(TlsSettings):
    host: str = "127.0.0.1"
    port: int = 50052
    # Triton gRPC endpoints serving the same model repository, comma-separated (the replicas).
    triton_url: str = "127.0.0.1:8001"
    # Replicas reserved for the enterprise tier, comma-separated; enterprise spills onto the shared ones.
    dedicated_triton_url: str = ""
    # Replicas found by DNS (router/discovery.py), NAME:PORT comma-separated, re-resolved every dns_interval_s: every
    # address of a name is a replica (a Kubernetes headless Service). With them, set triton_url "" unless the fixed
    # URLs are replicas too.
    triton_dns: str = ""
    dedicated_triton_dns: str = ""
    # Another region's replicas (URLs and names): they take work only while no local replica can serve a variant.
    fallback_triton_url: str = ""
    fallback_triton_dns: str = ""
    dns_interval_s: float = 5.0
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
    # The name Triton certificates are checked against, instead of the address dialled: replicas found by DNS are
    # reached by pod address, which no certificate made in advance names. "triton" is in every Triton certificate
    # control/certs.py and the Helm chart make. "" = the address itself.
    triton_tls_name: str = ""
    # The Triton model serving Embed (triton_models/embedding_model.py); used when the model repository holds it,
    # "" = no embeddings. Upper bound on one Embed call's Triton request.
    embedding_model: str = EMBEDDING_MODEL
    embed_timeout_s: float = 30.0
    # On SIGTERM: NOT_SERVING at once (balancers stop sending), then requests in flight get this long to finish.
    shutdown_grace_s: float = 30.0

    def replica_groups(self) -> list[ReplicaGroup]:
        """Shared, dedicated and fallback replicas; ValueError naming the flag when a DNS name lacks its port, and
        when no replica is configured at all."""

        def split(value: str) -> tuple[str, ...]:
            return tuple(u.strip() for u in value.split(",") if u.strip())

        groups = [
            ReplicaGroup(split(self.triton_url), tuple(parse_names(self.triton_dns, "--triton-dns"))),
            ReplicaGroup(
                split(self.dedicated_triton_url),
                tuple(parse_names(self.dedicated_triton_dns, "--dedicated-triton-dns")),
                dedicated=True,
            ),
            ReplicaGroup(
                split(self.fallback_triton_url),
                tuple(parse_names(self.fallback_triton_dns, "--fallback-triton-dns")),
                fallback=True,
            ),
        ]
        if not any(g.urls or g.names for g in groups[:2]):
            raise ValueError("no Triton replicas: set --triton-url or --triton-dns")
        if self.dns_interval_s <= 0:
            raise ValueError("--dns-interval-s must be positive")
        return groups
