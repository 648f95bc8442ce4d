"""Kubernetes exec probe for the llmesh image: exit 0 when healthy, 1 when not.

    probe.py grpc 127.0.0.1:50051 [--service NAME] [--alive] [--tls-dir DIR --part PART]
    probe.py http http://127.0.0.1:9901/ready

`grpc` asks grpc.health.v1 for SERVING; with --alive any answer will do (liveness: a service whose dependency is
down answers NOT_SERVING, and restarting it would not help). With --tls-dir it speaks mutual TLS with the part's own
certificate (DIR/ca.pem, DIR/PART.pem, DIR/PART.key) and checks the server's certificate for the name PART, which
every part's certificate carries: the native Kubernetes grpc probe can do neither. `http` wants a 2xx answer.
Shipped in the Helm chart (a ConfigMap), so it needs only what the image has: Python, grpcio, grpcio-health-checking.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from pathlib import Path


def grpc_health(target: str, service: str, tls_dir: Path | None, part: str, timeout_s: float, alive: bool) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if tls_dir is None:
        channel = grpc.insecure_channel(target)
    else:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(tls_dir / "ca.pem").read_bytes(),
            private_key=(tls_dir / f"{part}.key").read_bytes(),
            certificate_chain=(tls_dir / f"{part}.pem").read_bytes(),
        )
        channel = grpc.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", part)])
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            print(f"{target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return False
    if reply.status != health_pb2.HealthCheckResponse.SERVING and not alive:
        print(f"{target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}", file=sys.stderr)
        return False
    return True


def http_ok(url: str, timeout_s: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return 200 <= int(response.status) < 300
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    g = sub.add_parser("grpc")
    g.add_argument("target")
    g.add_argument("--service", default="")
    g.add_argument("--tls-dir", type=Path)
    g.add_argument("--part", default="")
    g.add_argument("--alive", action="store_true", help="any answer counts, NOT_SERVING too")
    g.add_argument("--timeout-s", type=float, default=3.0)
    h = sub.add_parser("http")
    h.add_argument("url")
    h.add_argument("--timeout-s", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.kind == "grpc":
        if args.tls_dir is not None and not args.part:
            parser.error("--tls-dir needs --part")
        ok = grpc_health(args.target, args.service, args.tls_dir, args.part, args.timeout_s, args.alive)
    else:
        ok = http_ok(args.url, args.timeout_s)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
