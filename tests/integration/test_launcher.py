"""`llmesh up` as a user runs it: starts its own redis-server, serves through Envoy, reports a dead part, stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from control.launcher import MeshSettings
from control.process import free_ports
from llmesh.settings import to_argv


def wait_for_line(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        assert proc.poll() is None, f"launcher exited early:\n{log.read_text(errors='replace')}"
        time.sleep(0.3)
    raise AssertionError(f"{text!r} not printed within {timeout}s:\n{log.read_text(errors='replace')}")


def test_up_starts_redis_serves_and_reports_a_dead_part(triton_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
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
    ]  # fmt: skip
    out = tmp_path / "launcher.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        wait_for_line(out, "llmesh is up", proc, timeout=180)
        assert (state / "logs" / "redis.log").exists(), "the launcher should have started its own redis-server"
        models = httpx.get(f"http://127.0.0.1:{http_port}/v1/models", timeout=10)
        assert models.status_code == 401  # served by the gateway through Envoy; no key given

        gateway_pid = _pid_of(state, "gateway")
        assert "--max-messages=7" in Path(f"/proc/{gateway_pid}/cmdline").read_text().split("\0")
        os.kill(gateway_pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == 1
        text = out.read_text()
        assert "gateway killed by signal SIGKILL" in text, text
        assert "stopping the mesh" in text
        assert not (state / "llmesh.pid").exists()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    # Everything it started is gone, Redis included.
    assert not _port_open(redis_port)


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


def _pid_of(state: Path, name: str) -> int:
    return int(json.loads((state / "services.json").read_text())[name]["pid"])


def _port_open(port: int) -> bool:
    from control.process import port_open

    return port_open("127.0.0.1", port)
