"""`llmesh up` as a user runs it: starts its own redis-server, serves through Envoy, restarts a dead part, gives up
on one that keeps dying, stops."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from control.launcher import MeshSettings
from control.process import free_ports
from llmesh.settings import to_argv
from tests.fixtures.processes import Proc, descendants, running, wait_for_line


def test_up_starts_redis_serves_restarts_a_dead_part_and_gives_up_on_it(triton_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    http_port, admin_port, redis_port, *ports = free_ports(11)
    port = iter(ports)
    state = tmp_path / "state"
    argv = [
        sys.executable, "-m", "control.cli", "up",
        "--http-port", str(http_port), "--envoy-admin-port", str(admin_port),
        "--gateway-port", str(next(port)), "--router-port", str(next(port)),
        "--router-metrics-port", str(next(port)), "--gateway-metrics-port", str(next(port)),
        "--cache-port", str(next(port)), "--cache-metrics-port", str(next(port)),
        "--limiter-port", str(next(port)), "--limiter-metrics-port", str(next(port)),
        "--redis-url", f"redis://127.0.0.1:{redis_port}/0",
        "--external-triton-url", triton_server.grpc_url,
        "--model-repository", str(triton_server.model_repository),
        "--state-dir", str(state),
        # A service's own setting, passed through to it.
        "--gateway-max-messages", "7",
        # One restart allowed, soon.
        "--restart-max", "1", "--restart-backoff-s", "0.2",
    ]  # fmt: skip
    out = tmp_path / "launcher.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ})
    tree: dict[int, Proc] = {}
    try:
        wait_for_line(out, "llmesh is up", proc, timeout=180)
        assert (state / "logs" / "redis.log").exists(), "the launcher should have started its own redis-server"
        models = httpx.get(f"http://127.0.0.1:{http_port}/v1/models", timeout=10)
        assert models.status_code == 401  # served by the gateway through Envoy; no key given

        gateway_pid = _pid_of(state, "gateway")
        argv_before = Path(f"/proc/{gateway_pid}/cmdline").read_text().split("\0")
        assert "--max-messages=7" in argv_before
        tree = descendants(proc.pid)

        # Killed once: restarted with the same arguments (so the same port), and serving again.
        os.kill(gateway_pid, signal.SIGKILL)
        # Healthy (the status reader's own probe) and marked ready by the supervisor (its next poll: a moment later).
        status = _wait_status(
            state,
            lambda s: s["parts"][_index(s, "gateway")]["health"] == "healthy"
            and s["parts"][_index(s, "gateway")]["ready_at"] is not None,
            60,
        )
        gateway = status["parts"][_index(status, "gateway")]
        assert (gateway["restarts"], gateway["last_exit"]) == (1, "killed by signal SIGKILL")
        took = gateway["ready_at"] - gateway["last_exit_at"]
        print(f"\ngateway ready again {took:.1f} s after it died (backoff 0.2 s)")
        assert gateway["pid"] != gateway_pid and proc.poll() is None
        assert Path(f"/proc/{gateway['pid']}/cmdline").read_text().split("\0") == argv_before
        assert _wait_http(f"http://127.0.0.1:{http_port}/v1/models", 401, 30)

        # Killed again: past --restart-max, the launcher stops the mesh and says why.
        tree |= descendants(proc.pid)
        os.kill(gateway["pid"], signal.SIGKILL)
        assert proc.wait(timeout=90) == 1
        text = out.read_text()
        assert "gateway killed by signal SIGKILL" in text, text
        assert "it was restarted once within 300 s (--restart-max 1, --restart-window-s 300): giving up" in text
        assert "stopping the mesh" in text
        assert not (state / "llmesh.pid").exists()
        status_run = _status(state)
        assert status_run.returncode == 3, status_run.stdout + status_run.stderr
        assert "mesh: not running (last state: failed: gateway killed by signal SIGKILL" in status_run.stdout
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    # Everything it started is gone, Redis included.
    assert not _port_open(redis_port)
    assert not running(tree), tree


def test_down_stops_a_running_mesh(triton_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    state = tmp_path / "state"
    common = ["--state-dir", str(state)]
    # `llmesh up`'s flags written from its settings (to_argv is what `llmesh up` parses back).
    settings = MeshSettings.on_free_ports(
        redis_url=f"redis://127.0.0.1:{free_ports(1)[0]}/0",
        external_triton_url=triton_server.grpc_url,
        model_repository=triton_server.model_repository,
        state_dir=state,
    )
    http_port = settings.http_port
    argv = [sys.executable, "-m", "control.cli", "up", *to_argv(settings, only_changed=True)]
    out = tmp_path / "launcher.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_for_line(out, "llmesh is up", proc, timeout=180)
        down = subprocess.run(
            [sys.executable, "-m", "control.cli", "down", *common], capture_output=True, text=True, timeout=90
        )
        assert down.returncode == 0, down.stdout + down.stderr
        assert proc.wait(timeout=30) == 0
        assert not _port_open(http_port)
    finally:
        if proc.poll() is None:
            proc.kill()


def _status(state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "control.cli", "status", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _wait_status(state: Path, ok: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
    """`llmesh status --json` once `ok` holds for it."""
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run(
            [sys.executable, "-m", "control.cli", "status", "--json", "--state-dir", str(state)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        status: dict[str, Any] = json.loads(done.stdout)
        if ok(status):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.5)


def _index(status: dict[str, Any], name: str) -> int:
    return [p["name"] for p in status["parts"]].index(name)


def _wait_http(url: str, code: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=5).status_code == code:
                return True
        time.sleep(0.3)
    return False


def _pid_of(state: Path, name: str) -> int:
    return int(json.loads((state / "services.json").read_text())[name]["pid"])


def _port_open(port: int) -> bool:
    from control.process import port_open

    return port_open("127.0.0.1", port)
