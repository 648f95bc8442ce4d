"""Trust inside the mesh, with real processes: mutual TLS on every internal gRPC hop (services, Envoy's clusters,
router -> Triton), Redis with a password (and TLS, Redis Cluster included) that never shows on argv or in logs."""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import grpc
import httpx
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from control.certs import write_mesh_certs
from control.launcher import Mesh, MeshSettings, redis_answers, triton_tls_flags, write_redis_config
from control.process import ManagedProcess, ProcessFailed, free_port, free_ports, grpc_health_probe, tail
from limiter_service.policy import DEFAULT_POLICY_FILE
from llmesh import tls
from llmesh.paths import cache_dir
from llmesh.redis_auth import PASSWORD_ENV, RedisAuth
from llmesh.tls import TlsFiles
from llmesh.types import Tier
from llmesh.v1 import common_pb2, limiter_pb2, limiter_pb2_grpc
from tests.fixtures.mesh import RunningMesh, run_mesh, tls_flags
from triton_models.runtime import prepare_backend_dir, tritonserver_command

LIMITER = "llmesh.v1.LimiterService"


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout}s"
        time.sleep(0.2)


def health(target: str, files: TlsFiles | None, service: str = "") -> str:
    """The health status name, or the gRPC code that refused the call."""
    try:
        with tls.channel(target, files) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=3)
    except grpc.RpcError as err:
        return err.code().name  # type: ignore[no-any-return, attr-defined]
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def start_limiter(
    workdir: Path, redis_url: str, *extra: str, env: dict[str, str] | None = None, probe_tls: TlsFiles | None = None
) -> tuple[str, ManagedProcess]:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [
        sys.executable, "-m", "limiter_service", "--port", str(port), "--metrics-port", "0",
        "--redis-url", redis_url, "--policy-file", str(DEFAULT_POLICY_FILE), "--breaker-probe-s", "0.1", *extra,
    ]  # fmt: skip
    process = ManagedProcess("limiter", argv, workdir / "limiter.log", env=env).start()
    target = f"127.0.0.1:{port}"
    process.wait_ready(grpc_health_probe(target, LIMITER, probe_tls), timeout=60)
    return target, process


def quota_request() -> limiter_pb2.GetQuotaRequest:
    return limiter_pb2.GetQuotaRequest(key_id=uuid.uuid4().hex[:16], tier=common_pb2.TIER_FREE)


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


# ---- mutual TLS on one service ------------------------------------------------------------------------------


def test_a_service_refuses_callers_without_a_certificate_of_the_mesh_ca(redis_url: str, tmp_path: Path) -> None:
    mesh = write_mesh_certs(tmp_path / "tls")
    other = write_mesh_certs(tmp_path / "other")
    target, limiter = start_limiter(
        tmp_path / "limiter", redis_url, *tls_flags(mesh["limiter"]), probe_tls=mesh["client"]
    )
    try:
        callers = {
            "plaintext": None,
            # Trusts the mesh's CA (so it accepts the limiter), presents a certificate another CA signed.
            "foreign certificate": TlsFiles(
                mesh["client"].ca_file, other["client"].cert_file, other["client"].key_file
            ),
            # Another mesh altogether.
            "another mesh": other["client"],
        }
        for name, files in callers.items():
            with tls.channel(target, files) as channel:
                stub = limiter_pb2_grpc.LimiterServiceStub(channel)
                for call in (stub.GetQuota, stub.ResetQuota):
                    with pytest.raises(grpc.RpcError) as refused:
                        call(quota_request(), timeout=3)
                    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, name  # type: ignore[attr-defined]
            assert health(target, files) == "UNAVAILABLE", name
        with tls.channel(target, mesh["client"]) as channel:
            stub = limiter_pb2_grpc.LimiterServiceStub(channel)
            assert stub.ResetQuota(quota_request(), timeout=5).subject.startswith("key:")
        # Any part's certificate of this mesh is a valid caller (trust is per mesh, not per part).
        assert health(target, mesh["gateway"], LIMITER) == "SERVING"

        # The operator's tool finds the mesh's client certificate (LLMESH_MTLS_DIR, else <state dir>/tls).
        def quota_cli(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
            argv = [sys.executable, "-m", "control.cli", "quota", "reset", "0123456789abcdef", "--tier", "free"]
            return subprocess.run(
                [*argv, "--limiter-url", target], capture_output=True, text=True, timeout=60, env={**os.environ, **env}
            )

        done = quota_cli({"LLMESH_MTLS_DIR": str(tmp_path / "tls")})
        assert done.returncode == 0 and "reset key:0123456789abcdef" in done.stdout, done.stdout + done.stderr
        refused = quota_cli({"LLMESH_STATE_DIR": str(tmp_path / "no-mesh-here"), "LLMESH_MTLS_DIR": ""})
        assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr, refused.stdout + refused.stderr
    finally:
        limiter.stop()


def test_a_half_configured_service_does_not_fall_back_to_plaintext(redis_url: str, tmp_path: Path) -> None:
    files = write_mesh_certs(tmp_path / "tls")["limiter"]
    port = free_port()
    argv = [
        sys.executable, "-m", "limiter_service", "--port", str(port), "--metrics-port", "0", "--redis-url", redis_url,
        "--tls-ca-file", str(files.ca_file), "--tls-cert-file", str(files.cert_file),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "--tls-key-file" in done.stderr, done.stderr[-2000:]


# ---- Redis with a password, and over TLS -------------------------------------------------------------------


def start_redis(workdir: Path, password: str, *extra_config: str, port: int | None = None) -> ManagedProcess:
    """redis-server with `requirepass` from a 0600 config file (as `llmesh up` starts it)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_redis_config(workdir / "redis.conf", port if port is not None else free_port(), workdir, password)
    if extra_config:
        with config.open("a") as out:
            out.write("\n".join(extra_config) + "\n")
    return ManagedProcess("redis", ["redis-server", str(config)], workdir / "redis.log").start()


def test_services_use_the_redis_password_and_never_show_it(tmp_path: Path) -> None:
    password = "pw-" + secrets.token_urlsafe(24)
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    redis_proc = start_redis(tmp_path / "redis", password, port=port)
    started: list[ManagedProcess] = [redis_proc]
    try:
        redis_proc.wait_ready(lambda: redis_answers(url, RedisAuth(password)), timeout=20)
        with pytest.raises(redis.RedisError, match=r"NOAUTH|[Aa]uthenticat"):
            redis.Redis.from_url(url).set("x", "1")

        # The limiter takes it from the env var, the cache from a file.
        limiter_target, limiter = start_limiter(tmp_path / "limiter", url, env={**os.environ, PASSWORD_ENV: password})
        started.append(limiter)
        secret_file = tmp_path / "redis.password"
        secret_file.write_text(password + "\n")
        cache_port = free_port()
        cache = ManagedProcess(
            "cache",
            [sys.executable, "-m", "cache_service", "--port", str(cache_port), "--metrics-port", "0",
             "--redis-url", url, "--redis-password-file", str(secret_file), "--semantic-threshold", "0"],
            tmp_path / "cache.log",
        ).start()  # fmt: skip
        started.append(cache)
        cache.wait_ready(grpc_health_probe(f"127.0.0.1:{cache_port}"), timeout=60)
        # Without the password: a limiter that cannot use Redis (so the one above is not passing by luck).
        clean_env = {k: v for k, v in os.environ.items() if k != PASSWORD_ENV}
        bare_target, bare = start_limiter(tmp_path / "bare", url, env=clean_env)
        started.append(bare)

        wait_for(lambda: health(limiter_target, None, "redis") == "SERVING", 20, "limiter's Redis health")
        wait_for(lambda: health(f"127.0.0.1:{cache_port}", None, "llmesh.v1.CacheService") == "SERVING", 20, "cache")
        with grpc.insecure_channel(limiter_target) as channel:
            status = limiter_pb2_grpc.LimiterServiceStub(channel).GetQuota(quota_request(), timeout=5)
            assert not status.degraded
        time.sleep(1.0)  # a few of the bare limiter's Redis probes
        assert health(bare_target, None, "redis") == "NOT_SERVING"

        for proc in started:
            assert proc.pid is not None and password not in cmdline(proc.pid), proc.name
            assert password not in proc.log_path.read_text(errors="replace"), proc.name

        # `llmesh up` without the password says so, instead of starting a second Redis on the port.
        mesh = Mesh(MeshSettings.on_free_ports(redis_url=url, state_dir=tmp_path / "mesh"))
        with mock.patch.dict(os.environ, clean_env, clear=True), pytest.raises(ProcessFailed, match="credentials"):
            mesh.start()
    finally:
        for proc in reversed(started):
            proc.stop(grace=5)


def redis_tls_config(files: TlsFiles, tls_port: int) -> list[str]:
    return [
        f"tls-port {tls_port}",
        f'tls-cert-file "{files.cert_file}"',
        f'tls-key-file "{files.key_file}"',
        f'tls-ca-cert-file "{files.ca_file}"',
    ]


def test_limiter_on_a_tls_redis_cluster_with_a_password(tmp_path: Path) -> None:
    """rediss:// to a 3-master Redis Cluster that wants a password and client certificates on every node."""
    password = "pw-" + secrets.token_urlsafe(24)
    certs = write_mesh_certs(tmp_path / "tls", parts=("redis", "limiter", "client"))
    client = certs["client"]
    ports = free_ports(6)
    tls_ports, bus_ports = ports[:3], ports[3:]
    nodes = []
    try:
        for tls_port, bus_port in zip(tls_ports, bus_ports, strict=True):
            nodes.append(
                start_redis(
                    tmp_path / f"node-{tls_port}", password, *redis_tls_config(certs["redis"], tls_port),
                    "tls-cluster yes", "cluster-enabled yes", "cluster-config-file nodes.conf",
                    f"cluster-port {bus_port}", "cluster-node-timeout 2000", f'masterauth "{password}"',
                    port=0,
                )
            )  # fmt: skip
        auth = RedisAuth(password, client.ca_file, client.cert_file, client.key_file)
        for node, tls_port in zip(nodes, tls_ports, strict=True):
            node.wait_ready(lambda p=tls_port: redis_answers(f"rediss://127.0.0.1:{p}/0", auth), timeout=20)  # type: ignore[misc]
        tls_args = [
            "--tls",
            "--cacert",
            str(client.ca_file),
            "--cert",
            str(client.cert_file),
            "--key",
            str(client.key_file),
        ]
        create = subprocess.run(
            ["redis-cli", *tls_args, "--cluster", "create", *(f"127.0.0.1:{p}" for p in tls_ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60, env={**os.environ, "REDISCLI_AUTH": password},
        )  # fmt: skip
        assert create.returncode == 0, create.stdout + create.stderr

        def cluster_ok() -> bool:
            for p in tls_ports:
                node = redis.Redis(host="127.0.0.1", port=p, ssl=True, **auth.client_options("rediss://"))
                info = node.execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                if "cluster_state:ok" not in text:
                    return False
            return True

        wait_for(cluster_ok, 30, "cluster_state:ok on every node")
        flags = ["--redis-cluster", "true", "--redis-tls-ca-file", str(client.ca_file),
                 "--redis-tls-cert-file", str(certs["limiter"].cert_file),
                 "--redis-tls-key-file", str(certs["limiter"].key_file)]  # fmt: skip
        target, limiter = start_limiter(
            tmp_path / "limiter", f"rediss://127.0.0.1:{tls_ports[0]}/0", *flags,
            env={**os.environ, PASSWORD_ENV: password},
        )  # fmt: skip
        nodes.append(limiter)
        wait_for(lambda: health(target, None, "redis") == "SERVING", 20, "limiter's Redis health")
        with grpc.insecure_channel(target) as channel:
            stub = limiter_pb2_grpc.LimiterServiceStub(channel)
            for _ in range(30):  # key ids spread over the three masters (each misses one: (2/3)^30)
                request = quota_request()
                reserve = limiter_pb2.ReserveRequest(
                    key_id=request.key_id, tier=request.tier, prompt_tokens=10, max_tokens=10
                )
                assert stub.Reserve(reserve, timeout=5).allowed
                status = stub.GetQuota(request, timeout=5)
                assert not status.degraded and status.active_reservations == 1
        # Every master holds quota keys: each was reached over TLS with the password.
        counts = [
            redis.Redis(host="127.0.0.1", port=p, ssl=True, **auth.client_options("rediss://")).dbsize()
            for p in tls_ports
        ]
        assert all(c > 0 for c in counts), counts
        assert password not in cmdline(limiter.pid or 0) and password not in limiter.log_path.read_text()
    finally:
        for proc in reversed(nodes):
            proc.stop(grace=5)


# ---- router -> Triton ---------------------------------------------------------------------------------------


def test_router_reaches_triton_over_mutual_tls(
    triton_server,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    certs = write_mesh_certs(tmp_path / "tls")
    grpc_port, http_port, metrics_port, router_port = free_ports(4)
    argv, env = tritonserver_command(
        triton_server.model_repository, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port,
        backend_dir=prepare_backend_dir(cache_dir()),
    )  # fmt: skip
    triton = ManagedProcess(
        "tritonserver", [*argv, *triton_tls_flags(certs["triton"])], tmp_path / "triton.log", env=env
    )
    router = ManagedProcess(
        "router",
        [sys.executable, "-m", "router", "--port", str(router_port), "--metrics-port", "0",
         "--triton-url", f"127.0.0.1:{grpc_port}", "--triton-tls", "true",
         "--model-repository", str(triton_server.model_repository), "--health-interval-s", "0.5",
         *tls_flags(certs["router"])],
        tmp_path / "router.log",
    )  # fmt: skip
    try:
        triton.start().wait_ready(grpc_health_probe(f"127.0.0.1:{grpc_port}", "", certs["client"]), timeout=180)
        # Triton's gRPC refuses plaintext; its HTTP API (no client certificates) is off.
        assert health(f"127.0.0.1:{grpc_port}", None) == "UNAVAILABLE"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2)
        # The router's health is SERVING only with a healthy replica: it reached Triton over mutual TLS.
        router.start().wait_ready(grpc_health_probe(f"127.0.0.1:{router_port}", "", certs["client"]), timeout=60)
        assert health(f"127.0.0.1:{router_port}", certs["client"], "llmesh.v1.RouterService") == "SERVING"
    except BaseException:
        print("router log:\n" + tail(router.log_path, 40) + "\ntriton log:\n" + tail(triton.log_path, 40))
        raise
    finally:
        router.stop()
        triton.stop()


# ---- the whole mesh: `llmesh up`'s defaults ----------------------------------------------------------------


@pytest.fixture(scope="module")
def trusted_mesh(triton_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:  # type: ignore[no-untyped-def]
    """A mesh with its defaults: mutual TLS, and a redis-server of its own, which the launcher gives a password."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    yield from run_mesh(triton_server, url, tmp_path_factory, "trusted")


def test_mesh_serves_through_envoy_with_mutual_tls_inside(trusted_mesh: RunningMesh) -> None:
    mesh = trusted_mesh
    assert mesh.settings.mtls
    key = mesh.create_key(Tier.PAID)
    reply = httpx.post(
        f"{mesh.http_base}/v1/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "auto", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"]
    s = mesh.settings
    for name, port in (("gateway", s.gateway.port), ("router", s.router.port), ("cache", s.cache.port),
                       ("limiter", s.limiter.port)):  # fmt: skip
        target = f"127.0.0.1:{port}"
        assert health(target, None) == "UNAVAILABLE", name
        assert health(target, mesh.tls("client")) == "SERVING", name


def test_mesh_secrets_stay_private(trusted_mesh: RunningMesh) -> None:
    mesh = trusted_mesh
    state = mesh.mesh.state_dir
    password_file = state / "redis.password"
    password = password_file.read_text().strip()
    assert len(password) >= 32
    for path in [password_file, state / "redis.conf", *sorted((state / "tls").glob("*.key"))]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # Redis wants it ...
    with pytest.raises(redis.RedisError, match=r"NOAUTH|[Aa]uthenticat"):
        redis.Redis.from_url(mesh.redis_url).set("x", "1")
    # ... and no part shows it: not on argv (/proc/<pid>/cmdline, readable by every user), not in a log.
    for proc in mesh.mesh.processes:
        assert proc.pid is not None and password not in cmdline(proc.pid), proc.name
    for log in mesh.log_dir.glob("*.log"):
        assert password not in log.read_text(errors="replace"), log
    # Envoy's admin listens on loopback only.
    assert "address: 127.0.0.1, port_value" in (state / "envoy.yaml").read_text().split("static_resources")[0]
