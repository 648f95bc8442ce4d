"""`llmesh up`: start the mesh in dependency order, wait on health, stop everything if one part dies.

redis -> tritonserver -> cache -> limiter -> router -> gateway -> envoy.
One log file per service under <state dir>/logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from cache_service.config import CacheSettings
from control.envoy_config import EdgeConfig, envoy_command, render
from control.process import ManagedProcess, ProcessFailed, free_ports, grpc_health_probe, http_ok_probe
from gateway.config import GatewaySettings
from limiter_service.config import LimiterSettings
from llmesh import paths
from llmesh.settings import flat_class, section, to_argv, with_flags
from router.config import RouterSettings

log = logging.getLogger(__name__)


LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class MeshSettings:
    """What `llmesh up` starts: mesh-level knobs, and each service's own settings object.

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
    # Model repository to serve; empty = build (or reuse the cached build of) the default variants.
    model_repository: Path | None = None
    # Logs (<state dir>/logs), the rendered Envoy config, services.json, the pid file.
    state_dir: Path | None = None
    startup_timeout_s: float = 900.0
    # Every service's log level.
    log_level: str = GatewaySettings.log_level

    # Each service's own settings; metrics are on for all of them (the gateway's and router's are off by default).
    gateway: GatewaySettings = field(
        default_factory=lambda: GatewaySettings(metrics_port=9101),
        metadata=section(
            wired=("host", "router_url", "redis_url", "cache_url", "limiter_url", "log_level"),
            unprefixed=("default_max_tokens", "max_tokens_limit"),
        ),
    )
    router: RouterSettings = field(
        default_factory=lambda: RouterSettings(metrics_port=9102),
        metadata=section(wired=("host", "triton_url", "model_repository", "log_level")),
    )
    cache: CacheSettings = field(
        default_factory=CacheSettings, metadata=section(wired=("host", "redis_url", "log_level"))
    )
    limiter: LimiterSettings = field(
        default_factory=LimiterSettings, metadata=section(wired=("host", "redis_url", "log_level"))
    )

    def __post_init__(self) -> None:
        for name, values in self.wiring().items():
            object.__setattr__(self, name, dataclasses.replace(getattr(self, name), **values))

    def wiring(self) -> dict[str, dict[str, object]]:
        """The one place the services are connected: service -> its `wired` fields' values."""
        common = {"host": LOOPBACK, "log_level": self.log_level}
        return {
            "gateway": {
                **common,
                "router_url": f"{LOOPBACK}:{self.router.port}",
                "redis_url": self.redis_url,
                "cache_url": f"{LOOPBACK}:{self.cache.port}" if self.cache_enabled else "",
                "limiter_url": f"{LOOPBACK}:{self.limiter.port}",
            },
            "router": {**common, "triton_url": self.triton_url, "model_repository": self.model_repository},
            "cache": {**common, "redis_url": self.cache_redis_url or self.redis_url},
            "limiter": {**common, "redis_url": self.redis_url},
        }

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


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5).ping())
    except (redis.RedisError, OSError):
        return False


def _venv_bin(name: str) -> str:
    """Prefer the tool installed beside this interpreter (the project's venv), then PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


@dataclass
class Mesh:
    settings: MeshSettings
    processes: list[ManagedProcess] = field(default_factory=list)
    model_repository: Path | None = None

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

    def _start(self, name: str, argv: list[str], probe: Callable[[], bool], env: dict[str, str] | None = None) -> None:
        proc = ManagedProcess(name, argv, self.log_dir / f"{name}.log", env=env)
        log.info("starting %s (log: %s)", name, proc.log_path)
        self.processes.append(proc.start())
        self._write_services_file()
        proc.wait_ready(probe, timeout=self.settings.startup_timeout_s)
        log.info("%s is ready", name)

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_all()
        except BaseException:
            self.stop()
            raise

    def _start_all(self) -> None:
        s = self.settings
        service_env = {**os.environ, "PYTHONUNBUFFERED": "1"}

        if redis_answers(s.redis_url):
            log.info("reusing Redis at %s", s.redis_url)
        else:
            url = urlparse(s.redis_url)
            if url.hostname not in ("127.0.0.1", "localhost", "::1"):
                raise ProcessFailed(f"Redis at {s.redis_url} does not answer, and it is not local to start it")
            argv = [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(url.port or 6379),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.state_dir),
            ]
            self._start("redis", argv, lambda: redis_answers(s.redis_url))

        if s.model_repository is not None:
            self.model_repository = s.model_repository
        else:
            from triton_models.config import BuildSettings
            from triton_models.repository import ensure_model_repository

            log.info("building the model repository (cached after the first run)")
            self.model_repository = ensure_model_repository(BuildSettings())

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
                self._start("tritonserver" + (f"-{i}" if i else ""), argv, http_ok_probe(ready_url), env)

        # The router reads the repository built above.
        s = dataclasses.replace(s, model_repository=self.model_repository)

        def service(module: str, settings: object) -> list[str]:
            # Every field written out: what the launcher resolved (flags, LLMESH_* env, defaults) is what runs.
            return [sys.executable, "-m", module, *to_argv(settings)]

        if s.cache_enabled:
            cache_probe = grpc_health_probe(f"{LOOPBACK}:{s.cache.port}")
            self._start("cache", service("cache_service", s.cache), cache_probe, service_env)
        limiter_probe = grpc_health_probe(f"{LOOPBACK}:{s.limiter.port}", "llmesh.v1.LimiterService")
        self._start("limiter", service("limiter_service", s.limiter), limiter_probe, service_env)
        router_probe = grpc_health_probe(f"{LOOPBACK}:{s.router.port}")
        self._start("router", service("router", s.router), router_probe, service_env)
        gateway_probe = grpc_health_probe(f"{LOOPBACK}:{s.gateway.port}")
        self._start("gateway", service("gateway", s.gateway), gateway_probe, service_env)
        edge = EdgeConfig(
            listen_host=s.host,
            listen_port=s.http_port,
            admin_port=s.envoy_admin_port,
            gateways=((LOOPBACK, s.gateway.port),),
            limiter=(LOOPBACK, s.limiter.port),
        )
        config_path = self.state_dir / "envoy.yaml"
        config_path.write_text(render(edge))
        self._start(
            "envoy",
            [_venv_bin("envoy"), *envoy_command(config_path)[1:]],
            http_ok_probe(f"http://127.0.0.1:{s.envoy_admin_port}/ready"),
        )

    def _write_services_file(self) -> None:
        """<state dir>/services.json: name -> pid and log of each started part, for operators and tools."""
        services = {p.name: {"pid": p.pid, "log": str(p.log_path)} for p in self.processes}
        (self.state_dir / "services.json").write_text(json.dumps(services, indent=2))

    def first_dead(self) -> ManagedProcess | None:
        return next((p for p in self.processes if not p.alive()), None)

    def stop(self) -> None:
        for proc in reversed(self.processes):
            log.info("stopping %s", proc.name)
            proc.stop()
        self.processes.clear()
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / "services.json").unlink()


def pid_file(settings: MeshSettings) -> Path:
    return (settings.state_dir or paths.state_dir()) / "llmesh.pid"


def run_up(settings: MeshSettings) -> int:
    """Foreground launcher: returns when stopped (0) or when a part died (1)."""
    mesh = Mesh(settings)
    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

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
            f"llmesh is up: http://{settings.host}:{settings.http_port}/v1 (OpenAI API), "
            f"gRPC {settings.host}:{settings.http_port}, Envoy admin http://127.0.0.1:{settings.envoy_admin_port}\n"
            f"logs: {mesh.log_dir}\n"
            "create an API key: llmesh keys create --tier paid\n"
            "stop: Ctrl-C or `llmesh down`",
            flush=True,
        )
        while not stop_requested:
            dead = mesh.first_dead()
            if dead is not None:
                print(f"llmesh: {dead.exit_description()}\nllmesh: stopping the mesh", file=sys.stderr, flush=True)
                return 1
            time.sleep(0.5)
        return 0
    finally:
        mesh.stop()
        with contextlib.suppress(FileNotFoundError):
            pid_path.unlink()


def _running(pid: int) -> bool:
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
        if not _running(pid):
            print("llmesh: stopped")
            return 0
        time.sleep(0.2)
    print(f"llmesh: launcher (pid {pid}) did not stop within {timeout_s:.0f}s", file=sys.stderr)
    return 1
