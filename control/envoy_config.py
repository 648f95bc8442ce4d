"""Renders envoy/envoy.yaml.tmpl for a given set of ports and gateway addresses."""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ENVOY_DIR = Path(__file__).resolve().parent.parent / "envoy"
TEMPLATE = ENVOY_DIR / "envoy.yaml.tmpl"
DESCRIPTOR_SET = ENVOY_DIR / "llmesh.pb"


@dataclass(frozen=True)
class EdgeConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    admin_port: int = 9901
    gateways: Sequence[tuple[str, int]] = (("127.0.0.1", 50051),)
    request_timeout_s: int = 300
    stream_idle_timeout_s: int = 60
    health_interval_s: float = 2.0
    max_connections: int = 10000
    # The limiter's RateLimitService (per-IP and per-key request limits before the gateway).
    limiter: tuple[str, int] = ("127.0.0.1", 50053)
    # What Envoy does when the limiter does not answer within rate_limit_timeout_s: False lets the request through.
    rate_limit_failure_mode_deny: bool = False
    rate_limit_timeout_s: float = 0.25


def render(config: EdgeConfig, descriptor_set: Path = DESCRIPTOR_SET) -> str:
    endpoints = "\n".join(
        f"              - endpoint: {{ address: {{ socket_address: {{ address: {host}, port_value: {port} }} }} }}"
        for host, port in config.gateways
    )
    return string.Template(TEMPLATE.read_text()).substitute(
        ADMIN_PORT=config.admin_port,
        LISTEN_HOST=config.listen_host,
        LISTEN_PORT=config.listen_port,
        MAX_CONNECTIONS=config.max_connections,
        STREAM_IDLE_TIMEOUT=f"{config.stream_idle_timeout_s}s",
        REQUEST_TIMEOUT=f"{config.request_timeout_s}s",
        HEALTH_INTERVAL=f"{config.health_interval_s}s",
        DESCRIPTOR_SET=str(descriptor_set),
        GATEWAY_ENDPOINTS=endpoints,
        LIMITER_HOST=config.limiter[0],
        LIMITER_PORT=config.limiter[1],
        RATE_LIMIT_FAILURE_MODE_DENY="true" if config.rate_limit_failure_mode_deny else "false",
        RATE_LIMIT_TIMEOUT=f"{config.rate_limit_timeout_s}s",
    )


def envoy_command(config_path: Path, log_level: str = "warning") -> list[str]:
    # Hot restart needs shared memory keyed by base id; several Envoys on one box (tests, a running mesh)
    # would collide, and llmesh restarts Envoy whole anyway.
    return ["envoy", "-c", str(config_path), "--disable-hot-restart", "--log-level", log_level]
