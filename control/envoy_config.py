"""Renders envoy/envoy.yaml.tmpl for a given set of ports and gateway addresses, and the edge's own settings.

`EdgeSettings` is what an operator sets (`llmesh up --tls-cert ... --edge-max-request-body-bytes ...`): TLS at the
edge, and the limits Envoy applies to every client before the gateway sees a byte. `EdgeConfig` adds where things
are (ports, gateways, the limiter), which the launcher wires. docs/SECURITY.md explains each limit.
"""

from __future__ import annotations

import ipaddress
import json
import string
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from llmesh.tls import TlsFiles

ENVOY_DIR = Path(__file__).resolve().parent.parent / "envoy"
TEMPLATE = ENVOY_DIR / "envoy.yaml.tmpl"
DESCRIPTOR_SET = ENVOY_DIR / "llmesh.pb"

# The longest generation the route allows, and what the other timeouts are measured against.
DEFAULT_REQUEST_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class EdgeSettings:
    """TLS and limits at the edge (Envoy). Flags: `--tls-cert`, `--tls-key`, `--edge-<field>`."""

    tls_cert: Path | None = field(
        default=None,
        metadata={"help": "PEM certificate chain: the edge serves HTTPS and gRPC over TLS (ALPN h2, http/1.1)"},
    )
    tls_key: Path | None = field(default=None, metadata={"help": "PEM private key of --tls-cert"})
    # Larger than any legal request: the gateway's own JSON limits answer 400 below it. gRPC callers meet the
    # gateway's gRPC message limit instead (RESOURCE_EXHAUSTED).
    max_request_body_bytes: int = field(
        default=4 * 1024 * 1024,
        metadata={"help": "largest HTTP/JSON request body; larger is refused with 413 before the gateway"},
    )
    max_request_headers_kb: int = field(
        default=32,
        metadata={"help": "largest request headers in KiB; larger: 431 (HTTP/1.1) or a reset stream (HTTP/2)"},
    )
    max_request_headers_count: int = field(default=100, metadata={"help": "most headers in a request; more: 431"})
    request_headers_timeout_s: float = field(
        default=10.0,
        metadata={"help": "slow headers (slowloris): all headers within this, else 408 and the connection closed"},
    )
    # Disarmed once the request is complete (or its answer has begun), so it never cuts a generation.
    request_body_timeout_s: float = field(
        default=60.0,
        metadata={"help": "slow body: the whole request (headers and body) within this from its start, else 408"},
    )
    idle_timeout_s: float = field(
        default=60.0, metadata={"help": "a connection with no request in flight is closed after this"}
    )
    # Only the token-streaming gRPC method (StreamChatCompletion) keeps it: every other route may answer with one
    # body once generation is done (/v1/chat/completions with stream=false) and is bounded by request_timeout_s.
    stream_idle_timeout_s: float = field(
        default=60.0, metadata={"help": "a gRPC token stream with no bytes either way for this long is reset"}
    )
    request_timeout_s: float = field(
        default=DEFAULT_REQUEST_TIMEOUT_S,
        metadata={"help": "the whole request, generation included (also caps a gRPC client's grpc-timeout)"},
    )
    max_connections: int = field(
        default=10000, metadata={"help": "open client connections over all addresses (Envoy's overload manager)"}
    )
    # Asked of the limiter's rate limit service when a connection opens ([edge] per_ip_per_minute in its policy);
    # over it, the connection is closed at once. So an address opens at most that many connections a minute, and
    # keeping one open costs at least one request per idle_timeout_s.
    per_ip_connection_budget: bool = field(
        default=True,
        metadata={"help": "each new connection costs its client address one unit of the edge's per-minute budget"},
    )

    def check(self) -> None:
        """Raises ValueError naming the flag when a value cannot work."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both for TLS at the edge, or neither")
        for path, flag in ((self.tls_cert, "--tls-cert"), (self.tls_key, "--tls-key")):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{flag}: no such file: {path}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith(("_bytes", "_kb", "_count", "connections")) and not value > 0:
                raise ValueError(f"--edge-{f.name.replace('_', '-')} must be positive, not {value!r}")
            # Envoy reads 0 as "no timeout": a timeout is at least a millisecond.
            if f.name.endswith("_s") and not value >= 0.001:
                raise ValueError(f"--edge-{f.name.replace('_', '-')} must be at least 0.001 (seconds), not {value!r}")
        if self.max_request_headers_kb > 8192:
            raise ValueError("--edge-max-request-headers-kb is at most 8192 (Envoy's limit)")
        if self.max_request_body_bytes >= 2**32:
            raise ValueError("--edge-max-request-body-bytes must be below 4 GiB")
        if self.stream_idle_timeout_s > self.request_timeout_s:
            raise ValueError("--edge-stream-idle-timeout-s cannot be longer than --edge-request-timeout-s")


@dataclass(frozen=True)
class EdgeConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    admin_port: int = 9901
    gateways: Sequence[tuple[str, int]] = (("127.0.0.1", 50051),)
    health_interval_s: float = 2.0
    # The limiter's RateLimitService (per-IP and per-key request limits before the gateway).
    limiter: tuple[str, int] = ("127.0.0.1", 50053)
    # What Envoy does when the limiter does not answer within rate_limit_timeout_s: False lets the request through.
    rate_limit_failure_mode_deny: bool = False
    rate_limit_timeout_s: float = 0.25
    # TLS and limits. Without it (tests that count the limiter's answers exactly) connections cost no budget;
    # `llmesh up` passes its `--edge-*` settings, where they do.
    edge: EdgeSettings = EdgeSettings(per_ip_connection_budget=False)
    # Mutual TLS to the gateway and limiter clusters: the mesh's CA and Envoy's certificate (llmesh/tls.py); None =
    # plaintext (`llmesh up --no-mtls`).
    upstream_tls: TlsFiles | None = None


def _duration(seconds: float) -> str:
    """Envoy's duration, to the millisecond: 10 -> "10s", 1.5 -> "1.5s"."""
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"


def _downstream_tls(edge: EdgeSettings) -> str:
    """The listener's transport socket (one YAML flow line), or nothing for plaintext."""
    if edge.tls_cert is None or edge.tls_key is None:
        return ""
    socket = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(Path(edge.tls_cert).resolve())},
                        "private_key": {"filename": str(Path(edge.tls_key).resolve())},
                    }
                ],
                # gRPC needs h2; browsers, curl and the openai SDK (httpx) speak http/1.1.
                "alpn_protocols": ["h2", "http/1.1"],
            },
        },
    }
    return "transport_socket: " + json.dumps(socket)


def _upstream_tls(files: TlsFiles | None) -> str:
    """A cluster's transport socket (one YAML flow line): Envoy presents its certificate and trusts only servers
    the mesh's CA signed; or nothing for plaintext."""
    if files is None:
        return ""
    socket = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(Path(files.cert_file).resolve())},
                        "private_key": {"filename": str(Path(files.key_file).resolve())},
                    }
                ],
                "validation_context": {"trusted_ca": {"filename": str(Path(files.ca_file).resolve())}},
                # gRPC servers speak HTTP/2 only.
                "alpn_protocols": ["h2"],
            },
        },
    }
    return "transport_socket: " + json.dumps(socket)


def _connection_filters(config: EdgeConfig) -> str:
    """Network filters before the HTTP connection manager (YAML flow list items), or nothing."""
    if not config.edge.per_ip_connection_budget:
        return ""
    ratelimit = {
        "name": "envoy.filters.network.ratelimit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.ratelimit.v3.RateLimit",
            "stat_prefix": "edge_connections",
            "domain": "llmesh-edge",
            # The same descriptor as the HTTP filter's remote_address action: one budget per client address.
            "descriptors": [
                {"entries": [{"key": "remote_address", "value": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"}]}
            ],
            "timeout": _duration(config.rate_limit_timeout_s),
            "failure_mode_deny": config.rate_limit_failure_mode_deny,
            "rate_limit_service": {
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": "limiter"}},
            },
        },
    }
    return "- " + json.dumps(ratelimit)


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _yaml_host(host: str) -> str:
    """A host for a YAML flow mapping: an IPv6 address ("::1") quoted, anything else as it is."""
    return json.dumps(host) if ":" in host else host


def _discovery(hosts: Sequence[str]) -> str:
    """A cluster's `type` (and how it resolves names): STATIC when every host is an IP address; else STRICT_DNS,
    which re-resolves each name and makes every address it returns an endpoint (a Kubernetes headless Service lists
    its ready pods). IPv4 first: `localhost` and dual-stack names would otherwise resolve to ::1 or an IPv6 address
    that services bound to 0.0.0.0 or 127.0.0.1 do not listen on."""
    if all(_is_ip_literal(host) for host in hosts):
        return "type: STATIC"
    return "type: STRICT_DNS\n      dns_lookup_family: V4_PREFERRED"


def render(config: EdgeConfig, descriptor_set: Path = DESCRIPTOR_SET, template: Path = TEMPLATE) -> str:
    """The Envoy config. Raises ValueError for edge settings that cannot work (EdgeSettings.check).

    Gateway and limiter hosts are IP addresses (a STATIC cluster) or DNS names (STRICT_DNS). `template` and
    `descriptor_set` default to the repository's envoy/ folder; an installed llmesh (the container image) passes
    copies of them."""
    edge = config.edge
    edge.check()
    endpoints = "\n".join(
        "              - endpoint: { address: { socket_address: "
        f"{{ address: {_yaml_host(host)}, port_value: {port} }} }} }}"
        for host, port in config.gateways
    )
    return string.Template(template.read_text()).substitute(
        ADMIN_PORT=config.admin_port,
        LISTEN_HOST=_yaml_host(config.listen_host),
        LISTEN_PORT=config.listen_port,
        DOWNSTREAM_TLS=_downstream_tls(edge),
        UPSTREAM_TLS=_upstream_tls(config.upstream_tls),
        CONNECTION_FILTERS=_connection_filters(config),
        MAX_CONNECTIONS=edge.max_connections,
        MAX_REQUEST_BODY_BYTES=edge.max_request_body_bytes,
        MAX_REQUEST_HEADERS_KB=edge.max_request_headers_kb,
        MAX_REQUEST_HEADERS_COUNT=edge.max_request_headers_count,
        REQUEST_HEADERS_TIMEOUT=_duration(edge.request_headers_timeout_s),
        REQUEST_BODY_TIMEOUT=_duration(edge.request_body_timeout_s),
        IDLE_TIMEOUT=_duration(edge.idle_timeout_s),
        STREAM_IDLE_TIMEOUT=_duration(edge.stream_idle_timeout_s),
        REQUEST_TIMEOUT=_duration(edge.request_timeout_s),
        HEALTH_INTERVAL=f"{config.health_interval_s}s",
        DESCRIPTOR_SET=str(descriptor_set),
        GATEWAY_ENDPOINTS=endpoints,
        GATEWAY_DISCOVERY=_discovery([host for host, _ in config.gateways]),
        LIMITER_DISCOVERY=_discovery([config.limiter[0]]),
        LIMITER_HOST=_yaml_host(config.limiter[0]),
        LIMITER_PORT=config.limiter[1],
        RATE_LIMIT_FAILURE_MODE_DENY="true" if config.rate_limit_failure_mode_deny else "false",
        RATE_LIMIT_TIMEOUT=f"{config.rate_limit_timeout_s}s",
    )


def envoy_command(config_path: Path, log_level: str = "warning") -> list[str]:
    # Hot restart needs shared memory keyed by base id; several Envoys on one box (tests, a running mesh)
    # would collide, and llmesh restarts Envoy whole anyway.
    return ["envoy", "-c", str(config_path), "--disable-hot-restart", "--log-level", log_level]
