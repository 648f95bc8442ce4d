"""`host:port` as flags and gRPC targets write it: one parser and one formatter for every part."""

from __future__ import annotations

import ipaddress


def parse_host_port(text: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port` -> (host, port). Raises ValueError."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not HOST:PORT: {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    elif ":" in host:
        raise ValueError(f"an IPv6 address goes in brackets: [{host}]:{port}")
    return host, int(port)


def host_port(host: str, port: int) -> str:
    """`host:port`, with IPv6 literals bracketed as gRPC targets want them."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
