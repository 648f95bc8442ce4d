"""`llmesh up`: start the mesh in dependency order, wait on health, restart a part that dies (with backoff), stop
everything when one keeps dying.

redis -> tritonserver -> cache -> limiter -> router -> gateway -> envoy.
One log file per service under <state dir>/logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cache_service.config import CacheSettings
from control.certs import check_mesh_certs, part_files, write_mesh_certs
from control.envoy_config import EdgeConfig, EdgeSettings, envoy_command, render
from control.process import (
    Guardian,
    ManagedProcess,
    Probe,
    ProcessFailed,
    free_ports,
    grpc_health_probe,
    http_ok_probe,
    redis_probe,
    remove_shared_memory,
)
from control.supervisor import PartState, RestartPolicy, Supervisor
from gateway.config import GatewaySettings
from limiter_service.config import LimiterSettings
from llmesh import paths
from llmesh.redis_auth import GENERATED_PASSWORD_FILE, RedisAuth, RedisAuthSettings, redis_auth
from llmesh.settings import flat_class, section, to_argv, with_flags
from llmesh.tls import TlsFiles
from router.config import RouterSettings

log = logging.getLogger(__name__)


LOOPBACK = "127.0.0.1"
# The services' fields the mesh sets for mutual TLS and for Redis credentials.
_TLS = ("tls_ca_file", "tls_cert_file", "tls_key_file")
_REDIS_AUTH = ("redis_password_file", "redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file")


# Replica i listens on the Triton ports + 10 * i; more than this many tritonservers would not fit one machine anyway.
MAX_REPLICAS = 64


@dataclass(frozen=True)
class MeshSettings(RedisAuthSettings):
    """What `llmesh up` starts: mesh-level knobs, and each service's own settings object.

    The inherited Redis credentials are those of every part that uses Redis; when no password is set and the
    launcher starts its own redis-server, it makes one (<state dir>/redis.password, 0600).

    Flags and env vars (`llmesh up --help`): a knob is `--http-port` / `LLMESH_HTTP_PORT`; a service's field is
    `--gateway-max-messages` / `LLMESH_GATEWAY_MAX_MESSAGES`, the same env var the service itself reads. The
    services' `wired` fields have no flag: __post_init__ sets them from the knobs and from the other services'
    ports, so `settings.gateway` is exactly what the gateway is started with (`to_argv(settings.gateway)`).
    """

    # Envoy, the edge clients connect to (HTTP/1.1 and gRPC on one port).
    host: str = LOOPBACK
    http_port: int = 8080
    envoy_admin_port: int = 9901
    # Shared by the gateway (API keys), the limiter and the cache. Reused when something answers there;
    # otherwise `redis-server` is started on that port.
    redis_url: str = LimiterSettings.redis_url
    # The cache's Redis; empty = redis_url. A separate one keeps cache memory and outages away from the key store.
    cache_redis_url: str = ""
    # Response cache (cache_service) on or off.
    cache_enabled: bool = True
    # tritonserver processes serving the same repository; replica i listens on the triton ports + 10 * i.
    replicas: int = 1
    triton_grpc_port: int = 8001
    triton_http_port: int = 8000
    triton_metrics_port: int = 8002
    # An already running Triton (host:port of its gRPC endpoint) instead of starting one.
    external_triton_url: str = ""
    # Model repository to serve; empty = build (or reuse the cached build of) `variants`.
    model_repository: Path | None = None
    # Variants to build and serve when no model_repository is given (`--variants smollm2-135m-int8,qwen2.5-coder-0.5b`);
    # empty = the default three tiers (triton_models.catalogue.DEFAULT_VARIANTS).
    variants: tuple[str, ...] = ()
    # Logs (<state dir>/logs), the rendered Envoy config, services.json, the pid file.
    state_dir: Path | None = None
    startup_timeout_s: float = 900.0
    # Supervision (control/supervisor.py): a part that exits is started again, same argv and ports, after
    # restart_backoff_s, doubling up to restart_backoff_max_s (and back to restart_backoff_s once it stayed up
    # restart_reset_s); one that dies again after restart_max restarts within restart_window_s stops the mesh.
    # restart_max 0: any part that exits stops the mesh.
    restart_max: int = 5
    restart_window_s: float = 300.0
    restart_backoff_s: float = 0.5
    restart_backoff_max_s: float = 30.0
    restart_reset_s: float = 60.0
    # Every service's log level.
    log_level: str = GatewaySettings.log_level
    # Mutual TLS inside the mesh (docs/SECURITY.md): every internal gRPC hop (Envoy -> gateway and limiter, gateway
    # -> router, cache, limiter, router -> the tritonservers it starts) with certificates of a CA made for this
    # mesh, written to <state dir>/tls at each start.
    mtls: bool = field(
        default=True,
        metadata={"flag": "--no-mtls", "help": "plaintext gRPC between the mesh's parts (development only)"},
    )
    # An operator's certificates instead of generated ones: a folder with ca.pem and <part>.pem + <part>.key for
    # each of control/certs.py's MESH_PARTS.
    mtls_dir: Path | None = None

    # Each service's own settings; metrics are on for all of them (the gateway's and router's are off by default).
    gateway: GatewaySettings = field(
        default_factory=lambda: GatewaySettings(metrics_port=9101),
        metadata=section(
            wired=("host", "router_url", "redis_url", "cache_url", "limiter_url", "log_level", *_TLS, *_REDIS_AUTH),
            unprefixed=("default_max_tokens", "max_tokens_limit"),
        ),
    )
    router: RouterSettings = field(
        default_factory=lambda: RouterSettings(metrics_port=9102),
        metadata=section(wired=("host", "triton_url", "model_repository", "log_level", "triton_tls", *_TLS)),
    )
    cache: CacheSettings = field(
        default_factory=CacheSettings,
        metadata=section(wired=("host", "redis_url", "log_level", *_TLS, *_REDIS_AUTH)),
    )
    limiter: LimiterSettings = field(
        default_factory=LimiterSettings,
        metadata=section(wired=("host", "redis_url", "log_level", *_TLS, *_REDIS_AUTH)),
    )
    # The edge (Envoy): TLS to clients (`--tls-cert`, `--tls-key`) and its limits (`--edge-max-request-body-bytes`,
    # timeouts, the per-address connection budget); control/envoy_config.py.
    edge: EdgeSettings = field(default_factory=EdgeSettings, metadata=section(unprefixed=("tls_cert", "tls_key")))

    def __post_init__(self) -> None:
        # Checked before wiring, which lists every replica's address (a huge count would exhaust memory).
        if not 1 <= self.replicas <= MAX_REPLICAS:
            raise ValueError(f"--replicas must be between 1 and {MAX_REPLICAS}, got {self.replicas}")
        for name, values in self.wiring().items():
            object.__setattr__(self, name, dataclasses.replace(getattr(self, name), **values))

    def wiring(self) -> dict[str, dict[str, object]]:
        """The one place the services are connected: service -> its `wired` fields' values."""
        common = {"host": LOOPBACK, "log_level": self.log_level}
        redis_auth = {
            "redis_password_file": self.redis_password_file,
            "redis_tls_ca_file": self.redis_tls_ca_file,
            "redis_tls_cert_file": self.redis_tls_cert_file,
            "redis_tls_key_file": self.redis_tls_key_file,
        }
        return {
            "gateway": {
                **common,
                **self._tls_fields("gateway"),
                **redis_auth,
                "router_url": f"{LOOPBACK}:{self.router.port}",
                "redis_url": self.redis_url,
                "cache_url": f"{LOOPBACK}:{self.cache.port}" if self.cache_enabled else "",
                "limiter_url": f"{LOOPBACK}:{self.limiter.port}",
            },
            "router": {
                **common,
                **self._tls_fields("router"),
                "triton_url": self.triton_url,
                "model_repository": self.model_repository,
                # The tritonservers the launcher starts serve mutual TLS; an external one is its operator's choice.
                "triton_tls": self.mtls and not self.external_triton_url,
            },
            "cache": {
                **common,
                **self._tls_fields("cache"),
                **redis_auth,
                "redis_url": self.cache_redis_url or self.redis_url,
            },
            "limiter": {**common, **self._tls_fields("limiter"), **redis_auth, "redis_url": self.redis_url},
            # Nothing wired: every edge setting is the operator's; the launcher adds the ports (EdgeConfig).
            "edge": {},
        }

    @property
    def tls_dir(self) -> Path:
        """Where the parts' certificates are: the operator's folder, else <state dir>/tls (generated)."""
        return self.mtls_dir or (self.state_dir or paths.state_dir()) / "tls"

    def tls_files(self, part: str) -> TlsFiles | None:
        """`part`'s certificate files (control/certs.py MESH_PARTS), None with mutual TLS off."""
        return part_files(self.tls_dir, part) if self.mtls else None

    def _tls_fields(self, part: str) -> dict[str, object]:
        files = self.tls_files(part)
        return {
            "tls_ca_file": files.ca_file if files else None,
            "tls_cert_file": files.cert_file if files else None,
            "tls_key_file": files.key_file if files else None,
        }

    def redis_auth(self, env: Mapping[str, str]) -> RedisAuth:
        """The credentials the parts use for Redis (the launcher's own checks and tools too)."""
        return redis_auth(self, env)

    @property
    def restart_policy(self) -> RestartPolicy:
        """The restart_* knobs; ValueError names the flag that is out of range."""
        flags = {
            "max_restarts": "--restart-max",
            "window_s": "--restart-window-s",
            "backoff_s": "--restart-backoff-s",
            "backoff_max_s": "--restart-backoff-max-s",
            "reset_after_s": "--restart-reset-s",
        }
        try:
            return RestartPolicy(
                max_restarts=self.restart_max,
                window_s=self.restart_window_s,
                backoff_s=self.restart_backoff_s,
                backoff_max_s=self.restart_backoff_max_s,
                reset_after_s=self.restart_reset_s,
            )
        except ValueError as exc:
            message = str(exc)
            for name, flag in flags.items():
                message = re.sub(rf"\b{name}\b", flag, message)
            raise ValueError(message) from None

    @property
    def triton_url(self) -> str:
        """The router's replicas, comma-separated."""
        if self.external_triton_url:
            return self.external_triton_url
        return ",".join(f"{LOOPBACK}:{self.triton_grpc_port + 10 * i}" for i in range(self.replicas))

    @classmethod
    def on_free_ports(cls, **flags: object) -> MeshSettings:
        """Every listening port on a free loopback port (tests, benchmarks), then `flags`, named as `llmesh up`'s
        flags (`limiter_policy_file=...` for `--limiter-policy-file`)."""
        names = [f.name for f in dataclasses.fields(flat_class(cls)) if f.name.endswith("_port")]
        ports = dict(zip(names, free_ports(len(names)), strict=True))
        return with_flags(cls(), **{**ports, **flags})


def triton_tls_flags(tls: TlsFiles) -> list[str]:
    """tritonserver flags for mutual TLS on its gRPC endpoint, and its HTTP endpoint off."""
    return [
        "--allow-http=false",
        "--grpc-use-ssl-mutual=true",
        f"--grpc-server-cert={tls.cert_file}",
        f"--grpc-server-key={tls.key_file}",
        f"--grpc-root-cert={tls.ca_file}",
    ]


def redis_answers(url: str, auth: RedisAuth | None = None) -> bool:
    import redis

    options = auth.client_options(url) if auth is not None else {}
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5, **options).ping())
    except (redis.RedisError, OSError):
        return False


def _redis_config_string(value: str) -> str:
    """`value` as a double-quoted redis.conf argument (backslash escapes; \\xHH for anything not printable)."""
    out = []
    for byte in value.encode():
        char = chr(byte)
        if char in '"\\':
            out.append("\\" + char)
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            out.append(f"\\x{byte:02x}")
    return '"' + "".join(out) + '"'


def write_redis_config(path: Path, port: int, state_dir: Path, password: str | None) -> Path:
    """redis.conf for the redis-server the launcher starts, created 0600: the password is in it, never on argv."""
    lines = ["bind 127.0.0.1", f"port {port}", 'save ""', "appendonly no"]
    lines.append(f"dir {_redis_config_string(str(state_dir))}")
    if password is not None:
        lines.append(f"requirepass {_redis_config_string(password)}")
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(lines) + "\n")
    return path


def _venv_bin(name: str) -> str:
    """Prefer the tool installed beside this interpreter (the project's venv), then PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


@dataclass
class Mesh:
    """The mesh's processes: `start()` brings every part up in order (all or nothing); `supervise()`, called by
    `llmesh up`'s loop, restarts parts that exit; `stop()` stops them in reverse order.

    <state dir>/status.json (what `llmesh status` reads) is rewritten atomically whenever a part changes."""

    settings: MeshSettings
    model_repository: Path | None = None
    clock: Callable[[], float] = time.monotonic
    # "starting", "running", "stopping", "stopped", "failed" (a part past its restart budget), with why.
    state: str = field(default="starting", init=False)
    message: str = field(default="", init=False)
    supervisor: Supervisor = field(init=False)
    guardian: Guardian = field(init=False)
    _status_written: dict[str, Any] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.supervisor = Supervisor(self.settings.restart_policy, self.settings.startup_timeout_s, self.clock)
        self.guardian = Guardian(self.log_dir / "guardian.log")
        self._wall_offset = time.time() - self.clock()

    @property
    def processes(self) -> list[ManagedProcess]:
        return [p.process for p in self.supervisor.parts if isinstance(p.process, ManagedProcess)]

    @property
    def state_dir(self) -> Path:
        return self.settings.state_dir or paths.state_dir()

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def triton_url(self) -> str:
        """The router's replicas, comma-separated."""
        return self.settings.triton_url

    def _start(
        self,
        name: str,
        argv: list[str],
        probe: Callable[[], bool],
        env: dict[str, str] | None = None,
        on_exit: Callable[[], object] | None = None,
    ) -> None:
        proc = ManagedProcess(name, argv, self.log_dir / f"{name}.log", env=env, guardian=self.guardian)
        proc.on_exit = on_exit
        log.info("starting %s (log: %s)", name, proc.log_path)
        part = self.supervisor.add(proc.start(), probe, self.part_ports(name))
        self.write_status()
        proc.wait_ready(probe, timeout=self.settings.startup_timeout_s)
        self.supervisor.ready(part)
        self.write_status()
        log.info("%s is ready", name)

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.guardian.start()
        try:
            self._start_all()
        except BaseException as exc:
            self.state, self.message = "failed", f"failed to start: {exc}"
            self.stop()
            raise
        self.state = "running"
        self.write_status()

    def supervise(self) -> str | None:
        """One round of supervision: restart what exited, when due. Returns why the mesh must stop (a part that
        kept dying), else None."""
        if not self.guardian.alive():
            log.warning("the process guardian exited; starting it again (log: %s)", self.guardian.log_path)
            self.guardian.start()
        failure = self.supervisor.poll()
        if failure is not None:
            self.state, self.message = "failed", failure.splitlines()[-1]
        self.write_status()
        return failure

    def part_ports(self, name: str) -> dict[str, int]:
        """What part `name` listens on, for `llmesh status`."""
        s = self.settings
        if name == "redis":
            return {"redis": urlparse(s.redis_url).port or 6379}
        if name.startswith("tritonserver"):
            i = int(name.partition("-")[2] or 0)
            return {
                "grpc": s.triton_grpc_port + 10 * i,
                "http": s.triton_http_port + 10 * i,
                "metrics": s.triton_metrics_port + 10 * i,
            }
        if name == "envoy":
            return {"http": s.http_port, "admin": s.envoy_admin_port}
        service = getattr(s, name, None)
        if service is None:
            return {}
        ports = {"grpc": int(service.port)}
        if getattr(service, "metrics_port", 0):
            ports["metrics"] = int(service.metrics_port)
        return ports

    def _status_probe(self, name: str, probe: Callable[[], bool]) -> Probe | None:
        """The probe `llmesh status` runs again for part `name`: the launcher's, when it is plain data."""
        if isinstance(probe, Probe):
            return probe
        if name == "redis":
            return redis_probe(self.settings.redis_url)
        return None

    def status(self) -> dict[str, Any]:
        """The content of <state dir>/status.json; times are Unix times."""

        def wall(t: float | None) -> float | None:
            return None if t is None else round(t + self._wall_offset, 3)

        parts: list[dict[str, Any]] = []
        for part in self.supervisor.parts:
            probe = self._status_probe(part.name, part.probe)
            proc = part.process
            parts.append(
                {
                    "name": part.name,
                    "pid": proc.pid if part.state in (PartState.STARTING, PartState.RUNNING) else None,
                    "state": str(part.state),
                    "ports": part.ports,
                    "probe": probe.to_json() if probe is not None else None,
                    "restarts": part.restarts,
                    "started_at": wall(part.started_at),
                    "ready_at": wall(part.ready_at),
                    "last_exit": part.last_exit,
                    "last_exit_at": wall(part.died_at),
                    "restart_at": wall(part.restart_at),
                    "log": str(getattr(proc, "log_path", "")),
                }
            )
        return {
            "launcher_pid": os.getpid(),
            "launcher_start_ticks": process_start_ticks(os.getpid()),
            "state": self.state,
            "message": self.message,
            "state_dir": str(self.state_dir),
            "restart_policy": dataclasses.asdict(self.supervisor.policy),
            "parts": parts,
        }

    def write_status(self) -> None:
        """<state dir>/status.json (for `llmesh status`) and services.json (name -> pid and log, for `llmesh top`
        and scripts), each replaced atomically, when something changed."""
        status = self.status()
        if status == self._status_written:
            return
        _write_atomically(self.state_dir / "status.json", json.dumps(status, indent=2))
        # pid null: the part is down (waiting to be restarted, or given up on).
        services = {p["name"]: {"pid": p["pid"], "log": p["log"]} for p in status["parts"]}
        _write_atomically(self.state_dir / "services.json", json.dumps(services, indent=2))
        self._status_written = status

    def _start_all(self) -> None:
        s = self.settings
        try:
            s.edge.check()  # before starting anything: a bad --tls-cert is the operator's to fix, not Envoy's crash
        except ValueError as exc:
            raise ProcessFailed(str(exc)) from exc
        service_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._prepare_certificates()
        # The launcher's own identity for health probes (None with mutual TLS off).
        client_tls = s.tls_files("client")

        redis_auth = s.redis_auth(os.environ)
        if redis_answers(s.redis_url, redis_auth):
            log.info("reusing Redis at %s", s.redis_url)
        elif redis_probe(s.redis_url)():
            # It runs, but refuses us: starting another on its port would only fail less clearly.
            raise ProcessFailed(
                f"Redis at {s.redis_url} wants credentials the mesh does not have: set LLMESH_REDIS_PASSWORD or "
                "--redis-password-file (and the --redis-tls-* files for rediss://)"
            )
        else:
            url = urlparse(s.redis_url)
            if url.hostname not in ("127.0.0.1", "localhost", "::1") or url.scheme != "redis":
                raise ProcessFailed(f"Redis at {s.redis_url} does not answer, and it is not local to start it")
            if redis_auth.password is None:
                s = self.settings = with_flags(s, redis_password_file=self._new_redis_password())
                redis_auth = s.redis_auth(os.environ)
            config = write_redis_config(
                self.state_dir / "redis.conf", url.port or 6379, self.state_dir, redis_auth.password
            )
            self._start("redis", ["redis-server", str(config)], lambda: redis_answers(s.redis_url, redis_auth))

        if s.model_repository is not None:
            self.model_repository = s.model_repository
        else:
            from triton_models.config import BuildSettings
            from triton_models.repository import ensure_model_repository

            build = BuildSettings(variants=s.variants) if s.variants else BuildSettings()
            log.info("building the model repository of %s (cached after the first run)", ", ".join(build.variants))
            self.model_repository = ensure_model_repository(build)

        if not s.external_triton_url:
            from triton_models.runtime import prepare_backend_dir, tritonserver_command

            backend_dir = prepare_backend_dir(paths.cache_dir())
            for i in range(s.replicas):
                argv, env = tritonserver_command(
                    self.model_repository,
                    grpc_port=s.triton_grpc_port + 10 * i,
                    http_port=s.triton_http_port + 10 * i,
                    metrics_port=s.triton_metrics_port + 10 * i,
                    backend_dir=backend_dir,
                )
                ready_url = f"http://127.0.0.1:{s.triton_http_port + 10 * i}/v2/health/ready"
                probe = http_ok_probe(ready_url)
                triton_tls = s.tls_files("triton")
                if triton_tls is not None:
                    # Mutual TLS on gRPC (the router's only way in). Its HTTP API has no TLS client auth: off, so
                    # nobody on the host infers around the gateway's keys and quotas. Metrics stay (read-only).
                    argv += triton_tls_flags(triton_tls)
                    probe = grpc_health_probe(f"{LOOPBACK}:{s.triton_grpc_port + 10 * i}", "", client_tls)
                name = "tritonserver" + (f"-{i}" if i else "")
                # Python-backend shared memory named per replica and launcher, so what a killed replica leaves in
                # /dev/shm is removed before it restarts.
                shm_prefix = f"llmesh-{os.getpid()}-{name}-"
                argv.append(f"--backend-config=python,shm-region-prefix-name={shm_prefix}")
                self.guardian.remove_shared_memory(shm_prefix)
                self._start(name, argv, probe, env, on_exit=functools.partial(remove_shared_memory, shm_prefix))

        # The router reads the repository built above.
        s = dataclasses.replace(s, model_repository=self.model_repository)

        def service(module: str, settings: object) -> list[str]:
            # Every field written out: what the launcher resolved (flags, LLMESH_* env, defaults) is what runs.
            return [sys.executable, "-m", module, *to_argv(settings)]

        if s.cache_enabled:
            cache_probe = grpc_health_probe(f"{LOOPBACK}:{s.cache.port}", "", client_tls)
            self._start("cache", service("cache_service", s.cache), cache_probe, service_env)
        limiter_probe = grpc_health_probe(f"{LOOPBACK}:{s.limiter.port}", "llmesh.v1.LimiterService", client_tls)
        self._start("limiter", service("limiter_service", s.limiter), limiter_probe, service_env)
        router_probe = grpc_health_probe(f"{LOOPBACK}:{s.router.port}", "", client_tls)
        self._start("router", service("router", s.router), router_probe, service_env)
        gateway_probe = grpc_health_probe(f"{LOOPBACK}:{s.gateway.port}", "", client_tls)
        self._start("gateway", service("gateway", s.gateway), gateway_probe, service_env)
        edge = EdgeConfig(
            listen_host=s.host,
            listen_port=s.http_port,
            admin_port=s.envoy_admin_port,
            gateways=((LOOPBACK, s.gateway.port),),
            limiter=(LOOPBACK, s.limiter.port),
            upstream_tls=s.tls_files("envoy"),
            edge=s.edge,
        )
        config_path = self.state_dir / "envoy.yaml"
        config_path.write_text(render(edge))
        self._start(
            "envoy",
            [_venv_bin("envoy"), *envoy_command(config_path)[1:]],
            http_ok_probe(f"http://127.0.0.1:{s.envoy_admin_port}/ready"),
        )

    def _prepare_certificates(self) -> None:
        """Mutual TLS: a new CA and certificates for this mesh, or the operator's folder checked."""
        s = self.settings
        if not s.mtls:
            log.warning("mutual TLS is off: every part of the mesh accepts plaintext gRPC from anyone on this host")
        elif s.mtls_dir is not None:
            check_mesh_certs(s.mtls_dir)
        else:
            write_mesh_certs(s.tls_dir)
            log.info("mutual TLS: CA and certificates for this mesh in %s", s.tls_dir)

    def _new_redis_password(self) -> Path:
        """A random password for the redis-server the launcher starts, in <state dir>/redis.password (0600)."""
        import secrets

        path = self.state_dir / GENERATED_PASSWORD_FILE
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(32) + "\n")
        return path

    def stop(self) -> None:
        """Stop every part in reverse order; status.json stays, saying the mesh stopped (or failed, and why)."""
        if self.state != "failed":
            self.state = "stopping"
        with contextlib.suppress(OSError):
            self.write_status()
        self.supervisor.stop_all()
        self.guardian.close()
        if self.state != "failed":
            self.state = "stopped"
        with contextlib.suppress(OSError):
            self.write_status()
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / "services.json").unlink()


def _write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never a part of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def pid_file(settings: MeshSettings) -> Path:
    return (settings.state_dir or paths.state_dir()) / "llmesh.pid"


def status_file(settings: MeshSettings) -> Path:
    return (settings.state_dir or paths.state_dir()) / "status.json"


def run_up(settings: MeshSettings) -> int:
    """Foreground launcher: returns when stopped (0), or when it could not start or a part kept dying (1)."""
    try:
        mesh = Mesh(settings)
    except ValueError as exc:
        print(f"llmesh: {exc}", file=sys.stderr)
        return 2
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    pid_path = pid_file(settings)
    pid_path.parent.mkdir(parents=True, exist_ok=True)
    pid_path.write_text(str(os.getpid()))
    try:
        try:
            mesh.start()
        except ProcessFailed as exc:
            print(f"llmesh: failed to start: {exc}", file=sys.stderr)
            return 1
        print(
            f"llmesh is up: {'https' if settings.edge.tls_cert else 'http'}://{settings.host}:{settings.http_port}/v1 "
            f"(OpenAI API), gRPC{' over TLS' if settings.edge.tls_cert else ''} {settings.host}:{settings.http_port}, "
            f"Envoy admin http://127.0.0.1:{settings.envoy_admin_port}\n"
            f"logs: {mesh.log_dir}\n"
            "create an API key: llmesh keys create --tier paid\n"
            "stop: Ctrl-C or `llmesh down`",
            flush=True,
        )
        # A part that exits is restarted (control/supervisor.py); only one that keeps dying stops the mesh.
        while not stop_requested.wait(0.5):
            failure = mesh.supervise()
            if failure is not None:
                print(f"llmesh: {failure}\nllmesh: stopping the mesh", file=sys.stderr, flush=True)
                return 1
        return 0
    finally:
        mesh.stop()
        with contextlib.suppress(FileNotFoundError):
            pid_path.unlink()


def process_start_ticks(pid: int) -> int | None:
    """When `pid` started (clock ticks after boot, /proc/PID/stat field 22): with the pid, names one process even
    after its number is reused."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (FileNotFoundError, IndexError, ValueError):
        return None


def pid_running(pid: int) -> bool:
    """True while `pid` runs; an exited process its parent has not reaped yet (a zombie) counts as stopped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def run_down(settings: MeshSettings, timeout_s: float = 60.0) -> int:
    path = pid_file(settings)
    try:
        pid = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        print("llmesh: no running mesh found", file=sys.stderr)
        return 1
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        path.unlink(missing_ok=True)
        print("llmesh: the mesh was not running (stale pid file removed)", file=sys.stderr)
        return 1
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_running(pid):
            print("llmesh: stopped")
            return 0
        time.sleep(0.2)
    print(f"llmesh: launcher (pid {pid}) did not stop within {timeout_s:.0f}s", file=sys.stderr)
    return 1
