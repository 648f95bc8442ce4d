"""`llmesh serve envoy` and `llmesh serve limiter` as a container runs them: the limiter's command execs its server
(the pid stays, so signals reach it), Envoy's stays as its parent to drain it on SIGTERM, and Envoy reaches a gateway
and the limiter named by DNS (`localhost:PORT`, a STRICT_DNS cluster) as it would reach Kubernetes Services. The
gateway here is a gRPC health server standing in for one: what is under test is Envoy, not the gateway."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from control.process import ManagedProcess, free_ports, grpc_health_probe, http_ok_probe, tail
from tests.fixtures.limiter import RedisProcess

LLMESH = str(Path(sys.executable).parent / "llmesh")


class SlowHealth(health.HealthServicer):
    """Answers the service "slow" after SLOW_S: a request still in flight when Envoy is told to stop."""

    def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext) -> Any:
        if request.service == "slow":
            time.sleep(SLOW_S)
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        return super().Check(request, context)


SLOW_S = 3.0


@pytest.fixture
def stand_in_gateway() -> Iterator[int]:
    """A gRPC server on 127.0.0.1 answering health checks as a serving gateway does; yields its port."""
    (port,) = free_ports(1)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = SlowHealth()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("llmesh.v1.ChatService", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield port
    server.stop(grace=None)


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_text().split("\0")


def _stats(admin_port: int) -> dict[str, int]:
    text = httpx.get(f"http://127.0.0.1:{admin_port}/stats", timeout=5).text
    pairs = (line.split(": ", 1) for line in text.splitlines() if ": " in line)
    return {k: int(v) for k, v in pairs if v.isdigit()}


def test_serve_envoy_reaches_gateway_and_limiter_by_dns_name(
    private_redis: RedisProcess, stand_in_gateway: int, tmp_path: Path
) -> None:
    limiter_port, limiter_metrics, envoy_port, admin_port = free_ports(4)
    limiter = ManagedProcess(
        "limiter",
        [LLMESH, "serve", "limiter", "--host", "127.0.0.1", "--port", str(limiter_port),
         "--metrics-port", str(limiter_metrics), "--redis-url", private_redis.url],
        tmp_path / "limiter.log",
    )  # fmt: skip
    envoy = ManagedProcess(
        "envoy",
        [LLMESH, "serve", "envoy", "--host", "127.0.0.1", "--port", str(envoy_port), "--admin-port", str(admin_port),
         "--gateways", f"localhost:{stand_in_gateway}", "--limiter", f"localhost:{limiter_port}",
         "--config-dir", str(tmp_path), "--log-level", "info"],
        tmp_path / "envoy.log",
    )  # fmt: skip
    try:
        limiter.start().wait_ready(grpc_health_probe(f"127.0.0.1:{limiter_port}", "llmesh.v1.LimiterService"), 60)
        envoy.start().wait_ready(http_ok_probe(f"http://127.0.0.1:{admin_port}/ready"), 60)
        assert limiter.popen is not None and envoy.popen is not None
        # exec, not a child: the started pid is the service itself (setpriv, which ManagedProcess may put first,
        # execs too), so a container's SIGTERM reaches the server that drains on it.
        assert "limiter_service" in _cmdline(limiter.popen.pid)
        # Envoy itself is the child of `llmesh serve envoy`, which drains it on SIGTERM.
        children = Path(f"/proc/{envoy.popen.pid}/task/{envoy.popen.pid}/children").read_text().split()
        assert [Path(f"/proc/{c}/exe").resolve().name for c in children] == ["envoy"]
        config = next(tmp_path.glob("llmesh-envoy-*/envoy.yaml")).read_text()
        assert config.count("type: STRICT_DNS") == 2

        # The name resolved to the gateway's IPv4 address and its health check passed.
        endpoint = f"gateway::127.0.0.1:{stand_in_gateway}::"
        deadline = time.monotonic() + 30
        while f"{endpoint}health_flags::healthy" not in (
            clusters := httpx.get(f"http://127.0.0.1:{admin_port}/clusters", timeout=5).text
        ):
            assert time.monotonic() < deadline, (
                f"gateway endpoint never healthy:\n{clusters}\n{tail(envoy.log_path, 40)}"
            )
            time.sleep(0.5)
        assert f"{endpoint}hostname::localhost" in clusters

        # A gRPC call through the edge reaches the stand-in gateway, after the limiter admitted it.
        with grpc.insecure_channel(f"127.0.0.1:{envoy_port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="llmesh.v1.ChatService"), timeout=10
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stats = _stats(admin_port)
        assert stats.get("cluster.gateway.upstream_rq_completed", 0) >= 1, stats
        # Envoy fails open when the limiter cannot be reached; "ok" counts only the limiter's own answers.
        assert stats.get("cluster.gateway.ratelimit.ok", 0) >= 1, {k: v for k, v in stats.items() if "limit" in k}
        assert stats.get("cluster.limiter.upstream_cx_connect_fail", 0) == 0

        # SIGTERM with a request in flight: it is answered, then Envoy stops and the command exits 0.
        with grpc.insecure_channel(f"127.0.0.1:{envoy_port}") as channel:
            slow = health_pb2_grpc.HealthStub(channel).Check.future(
                health_pb2.HealthCheckRequest(service="slow"), timeout=30
            )
            time.sleep(1.0)
            started = time.monotonic()
            envoy.popen.send_signal(signal.SIGTERM)
            assert slow.result().status == health_pb2.HealthCheckResponse.SERVING, "the request in flight was cut"
        assert envoy.popen.wait(timeout=30) == 0
        assert time.monotonic() - started >= SLOW_S - 1.5, "stopped before the request in flight was done"
    except BaseException:
        print(f"--- envoy log ---\n{tail(envoy.log_path, 60)}\n--- limiter log ---\n{tail(limiter.log_path, 60)}")
        raise
    finally:
        envoy.stop()
        limiter.stop()
