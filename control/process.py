"""Child processes with one log file each, health probes, orderly shutdown, and no orphans.

Used by the launcher (`llmesh up`) and by the test fixtures, so both start servers the same way.

Every child leads its own process group (Ctrl-C in a terminal reaches only the launcher, which stops the children in
order) and is SIGKILLed by the kernel when the thread that started it dies (Linux `PR_SET_PDEATHSIG`), so a
launcher that is itself SIGKILLed leaves no server behind. A child's own children (tritonserver's python-backend
stubs) are not covered by that signal, and once tritonserver is a zombie that nobody reaps they would not notice
their parent is gone; the launcher therefore also runs a `Guardian`, which kills every child's whole process group
when the launcher goes away, however it went.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

if TYPE_CHECKING:
    from llmesh.tls import TlsFiles

log = logging.getLogger(__name__)


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


def describe_exit(returncode: int) -> str:
    """`exited with code 3`, `killed by signal SIGKILL`: what Popen's return code means."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        return f"killed by signal {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


# ---- dying with the parent ---------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_SETPRIV = shutil.which("setpriv")
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True) if sys.platform == "linux" else None


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """preexec_fn (runs in the child between fork and exec): SIGKILL this child when its parent's starting thread
    exits. The signal survives exec. If the parent died before the call took effect, die now."""
    assert _libc is not None
    prctl = _libc.prctl

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


class Guardian:
    """A small process that kills the launcher's process groups once the launcher is gone.

    The launcher tells it, over a pipe, each group it starts (`+PGID`) and each it has stopped and reaped (`-PGID`).
    When the pipe closes (the launcher exited: stopped, crashed or SIGKILLed) it SIGKILLs every group still listed,
    then removes the shared memory it was told of (`~PREFIX`).
    A group is unlisted before its leader is reaped, while the leader's pid still holds the group id, so the
    guardian can never signal an unrelated group that reused the number.
    """

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.popen: subprocess.Popen[bytes] | None = None
        self._groups: set[int] = set()
        self._prefixes: set[str] = set()

    def start(self) -> Guardian:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as sink:
            # Not tied to this process's death (that is when it has work to do); its own session, so a signal to
            # the launcher's process group does not reach it.
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "control.guardian"],
                stdin=subprocess.PIPE,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        for pgid in self._groups:
            self._send(f"+{pgid}")
        for prefix in self._prefixes:
            self._send(f"~{prefix}")
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def watch(self, pgid: int) -> None:
        self._groups.add(pgid)
        self._send(f"+{pgid}")

    def forget(self, pgid: int) -> None:
        self._groups.discard(pgid)
        self._send(f"-{pgid}")

    def remove_shared_memory(self, prefix: str) -> None:
        """Once the launcher is gone, also remove shared memory named `prefix`* (see remove_shared_memory)."""
        self._prefixes.add(prefix)
        self._send(f"~{prefix}")

    def _send(self, line: str) -> None:
        if self.popen is None or self.popen.stdin is None:
            return
        try:
            self.popen.stdin.write(line.encode() + b"\n")
            self.popen.stdin.flush()
        except (BrokenPipeError, ValueError):
            # Gone (it is restarted with the full list by whoever notices), or closed by close().
            log.warning("the process guardian is not running (log: %s)", self.log_path)

    def close(self, timeout: float = 5.0) -> None:
        """Close the pipe (the guardian kills what is still listed, normally nothing) and wait for it."""
        if self.popen is None:
            return
        if self.popen.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.popen.stdin.close()
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


# ---- one child ---------------------------------------------------------------------------------------------


@dataclass
class ManagedProcess:
    """One child process whose stdout+stderr go to `log_path`; `start()` again after it ended to restart it with the
    same argv and environment."""

    name: str
    argv: Sequence[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    guardian: Guardian | None = None
    # Called each time the process has ended and its group was killed: remove what a crash leaves behind.
    on_exit: Callable[[], object] | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> ManagedProcess:
        if self.popen is not None and self.popen.returncode is None and self.alive():
            raise ProcessFailed(f"{self.name} is already running (pid {self.popen.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # PR_SET_PDEATHSIG fires when the *thread* that forked the child exits: only tie children to the main
        # thread, which lives as long as the launcher (a worker thread's children would die with the worker).
        # util-linux's setpriv sets it and execs the command; Python code between fork and exec (preexec_fn) can
        # deadlock in the child when the parent has other threads (a launcher inside a test process hung there,
        # in the child's malloc), so that is only the fallback where setpriv is missing.
        argv, preexec = list(self.argv), None
        if _libc is not None and threading.current_thread() is threading.main_thread():
            if _SETPRIV is not None:
                argv = [_SETPRIV, "--pdeathsig", "KILL", "--", *argv]
            else:
                preexec = _die_with_parent(os.getpid())
        log_file = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        try:
            self.popen = subprocess.Popen(
                argv,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(self.env) if self.env is not None else None,
                cwd=self.cwd,
                # Own process group: Ctrl-C in the launcher's terminal reaches the launcher only,
                # which then stops children in reverse dependency order.
                start_new_session=True,
                preexec_fn=preexec,
            )
        finally:
            log_file.close()
        if self.guardian is not None:
            self.guardian.watch(self.popen.pid)
        return self

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode if self.popen else None

    def alive(self) -> bool:
        if self.popen is None or self.popen.returncode is not None:
            return False
        if not self._exited():
            return True
        self._finish()
        return False

    def _exited(self) -> bool:
        """Whether the leader has exited, without reaping it: until it is reaped its pid keeps the group id ours."""
        assert self.popen is not None
        try:
            info = os.waitid(os.P_PID, self.popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            # Reaped elsewhere (someone called popen.wait()).
            return self.popen.poll() is not None
        return info is not None

    def _finish(self) -> None:
        """The leader has exited: kill what it left in its group (e.g. tritonserver's stubs), unlist, reap."""
        assert self.popen is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        if self.guardian is not None:
            self.guardian.forget(self.popen.pid)
        self.popen.wait()
        if self.on_exit is not None:
            self.on_exit()

    def exit_summary(self) -> str:
        """`killed by signal SIGKILL`, `exited with code 1`, `running`, `never started`."""
        if self.popen is None:
            return "never started"
        if self.alive():
            return "running"
        assert self.popen.returncode is not None
        return describe_exit(self.popen.returncode)

    def exit_description(self) -> str:
        if self.popen is None:
            return f"{self.name} was never started"
        if self.alive():
            return f"{self.name} is running (pid {self.popen.pid})"
        return f"{self.name} {self.exit_summary()}; last lines of {self.log_path}:\n{tail(self.log_path)}"

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

    def _wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._exited():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL after `grace` seconds; whatever is left in the group is killed."""
        if self.popen is None or self.popen.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGTERM)
            # A stopped (SIGSTOPped) child handles SIGTERM only once it runs again.
            os.killpg(self.popen.pid, signal.SIGCONT)
        if not self._wait_exit(grace):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self._wait_exit(5)
        self._finish()


# ---- health probes -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """Whether a part answers: plain data, so the launcher can write it into its status file and `llmesh status`
    can ask again from another process. Calling it never raises for a part that does not answer."""

    kind: Literal["grpc", "http", "redis"]
    # host:port (grpc), a URL (http, redis; a redis URL is kept without its password).
    target: str
    # grpc.health.v1 service name ("" = the server as a whole).
    service: str = ""
    # Mutual TLS for grpc probes: a client certificate the mesh's CA signed.
    tls: TlsFiles | None = None
    timeout_s: float = 1.0

    def __call__(self) -> bool:
        if self.kind == "grpc":
            return self._grpc()
        if self.kind == "http":
            return self._http()
        return self._redis()

    def _grpc(self) -> bool:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            credentials = self.tls.channel_credentials() if self.tls is not None else None
        except ValueError:  # a certificate file that cannot be read (llmesh.tls.TlsConfigError)
            return False
        ch = grpc.secure_channel(self.target, credentials) if credentials else grpc.insecure_channel(self.target)
        try:
            with ch:
                reply = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=self.service), timeout=self.timeout_s
                )
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def _http(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(self.target, timeout=self.timeout_s) as resp:
                return bool(resp.status == 200)
        except (OSError, http.client.HTTPException):  # URLError and HTTPError are OSErrors
            return False

    def _redis(self) -> bool:
        return redis_responds(self.target, self.timeout_s)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "target": self.target}
        if self.service:
            out["service"] = self.service
        if self.tls is not None:
            out["tls"] = {
                "ca_file": str(self.tls.ca_file),
                "cert_file": str(self.tls.cert_file),
                "key_file": str(self.tls.key_file),
            }
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Probe:
        kind = data.get("kind")
        if kind not in ("grpc", "http", "redis") or not isinstance(data.get("target"), str):
            raise ValueError(f"not a probe: {json.dumps(data)[:200]}")
        tls = None
        if isinstance(files := data.get("tls"), Mapping):
            from llmesh.tls import TlsFiles

            tls = TlsFiles(Path(files["ca_file"]), Path(files["cert_file"]), Path(files["key_file"]))
        return cls(kind, data["target"], str(data.get("service", "")), tls)


def redis_responds(url: str, timeout: float = 0.5) -> bool:
    """True when a Redis server answers at `url`; one that wants a password `url` does not give counts as up
    (this asks whether the server runs, not whether a client may use it)."""
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout).ping())
    except redis.AuthenticationError:
        return True
    except redis.ResponseError as exc:
        return str(exc).startswith("NOAUTH")
    except (redis.RedisError, OSError):
        return False


def grpc_health_probe(target: str, service: str = "", tls: TlsFiles | None = None) -> Probe:
    """A probe that is true when grpc.health.v1 at `target` answers SERVING for `service` (over mutual TLS with
    `tls`, a client certificate of the mesh)."""
    return Probe("grpc", target, service, tls)


def http_ok_probe(url: str) -> Probe:
    return Probe("http", url)


def redis_probe(url: str) -> Probe:
    """A probe that is true when Redis at `url` answers; the URL is stored without credentials."""
    parsed = urlparse(url)
    if parsed.password or parsed.username:
        netloc = parsed.hostname or ""
        netloc = f"[{netloc}]" if ":" in netloc else netloc
        if parsed.port:
            netloc += f":{parsed.port}"
        url = parsed._replace(netloc=netloc).geturl()
    return Probe("redis", url)


def remove_shared_memory(prefix: str, shm_dir: Path = Path("/dev/shm")) -> list[str]:
    """Delete the POSIX shared memory objects whose names start with `prefix` (e.g. the python backend's regions
    of a tritonserver that was killed: Triton removes them itself only when it exits cleanly). Returns the names."""
    if not prefix or "/" in prefix:
        raise ValueError(f"not a shared memory name prefix: {prefix!r}")
    removed = []
    for path in shm_dir.glob(prefix + "*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path.name)
    return removed


def run_probe(probe: Callable[[], bool]) -> bool:
    """`probe()`, with a probe that raises counted as not answering (a Probe never raises; a plain callable may)."""
    try:
        return bool(probe())
    except Exception as exc:  # any failure of a health check means "not healthy"; logged
        log.debug("probe %r raised %r", probe, exc)
        return False
