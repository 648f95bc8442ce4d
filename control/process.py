"""Child processes with one log file each, health waiting and orderly shutdown.

Used by the launcher (`llmesh up`) and by the test fixtures, so both start servers the same way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


class ProcessFailed(RuntimeError):
    """A managed process exited or never became healthy; the message names it and quotes its log."""


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports: every socket stays bound until all are picked, so the kernel cannot hand
    out one port twice (separate `free_port()` calls can, and once gave a gateway and a limiter the same port)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tail(path: Path, max_lines: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(lines[-max_lines:])


@dataclass
class ManagedProcess:
    """One child process whose stdout+stderr go to `log_path`."""

    name: str
    argv: Sequence[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        try:
            self.popen = subprocess.Popen(
                list(self.argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(self.env) if self.env is not None else None,
                cwd=self.cwd,
                # Own process group: Ctrl-C in the launcher's terminal reaches the launcher only,
                # which then stops children in reverse dependency order.
                start_new_session=True,
            )
        finally:
            log.close()
        return self

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def exit_description(self) -> str:
        if self.popen is None:
            return f"{self.name} was never started"
        code = self.popen.poll()
        if code is None:
            return f"{self.name} is running (pid {self.popen.pid})"
        how = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        return f"{self.name} {how}; last lines of {self.log_path}:\n{tail(self.log_path)}"

    def wait_ready(self, probe: Callable[[], bool], timeout: float, interval: float = 0.2) -> None:
        """Poll `probe` until it is true; fail fast if the process dies first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise ProcessFailed(self.exit_description())
            with contextlib.suppress(Exception):
                if probe():
                    return
            time.sleep(interval)
        raise ProcessFailed(
            f"{self.name} not ready after {timeout:.0f}s; last lines of {self.log_path}:\n{tail(self.log_path)}"
        )

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL after `grace` seconds."""
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=5)


def grpc_health_probe(target: str, service: str = "") -> Callable[[], bool]:
    """A probe that is true when grpc.health.v1 at `target` answers SERVING for `service`."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def probe() -> bool:
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    return probe


def http_ok_probe(url: str) -> Callable[[], bool]:
    import urllib.request

    def probe() -> bool:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return bool(resp.status == 200)

    return probe
