"""`llmesh up`'s edge flags: TLS files and limits reach the rendered Envoy config; settings that cannot work stop
`llmesh up` with a message naming the flag, before anything is started."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from unittest import mock

import pytest
import yaml

from control import cli
from control.envoy_config import EdgeConfig, render
from control.launcher import MeshSettings, run_up
from tests.fixtures.edge import write_server_certificate


def llmesh_up(argv: list[str]) -> MeshSettings:
    seen: list[MeshSettings] = []
    with mock.patch.dict(os.environ, {}, clear=True), mock.patch.object(cli, "run_up", seen.append):
        cli.main(["up", *argv])
    return seen[0]


def test_flags_reach_the_rendered_config(tmp_path: Path) -> None:
    cert, key, _ = write_server_certificate(tmp_path)
    settings = llmesh_up(
        [
            f"--tls-cert={cert}",
            f"--tls-key={key}",
            "--edge-max-request-body-bytes=1000",
            "--edge-stream-idle-timeout-s=2.5",
            "--edge-request-timeout-s=120",
        ]
    )
    assert settings.edge.tls_cert == cert and settings.edge.tls_key == key
    listener = yaml.safe_load(render(EdgeConfig(edge=settings.edge)))["static_resources"]["listeners"][0]
    chain = listener["filter_chains"][0]
    assert chain["transport_socket"]["name"] == "envoy.transport_sockets.tls"
    manager = chain["filters"][-1]["typed_config"]
    assert manager["stream_idle_timeout"] == "2.5s"
    routes = manager["route_config"]["virtual_hosts"][0]["routes"]
    assert routes[0]["route"]["timeout"] == "120s"


def test_defaults() -> None:
    edge = MeshSettings().edge
    assert edge.tls_cert is None and edge.per_ip_connection_budget
    assert edge.stream_idle_timeout_s <= edge.request_timeout_s
    assert edge.request_body_timeout_s < edge.request_timeout_s


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tls-cert=cert.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-cert=/nonexistent/c.pem", "--tls-key=/nonexistent/k.pem"], "--tls-cert: no such file"),
        (["--edge-idle-timeout-s=0"], "--edge-idle-timeout-s must be at least 0.001"),
    ],
)
def test_bad_edge_settings_stop_llmesh_up_before_anything_starts(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = llmesh_up([*argv, f"--state-dir={tmp_path}", "--redis-url=redis://127.0.0.1:1/0"])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert run_up(settings) == 1
    finally:
        for sig, handler in handlers.items():  # run_up installs its own
            signal.signal(sig, handler)
    assert message in capsys.readouterr().err
    logs = {p.name for p in (tmp_path / "logs").iterdir()}
    assert not logs & {"redis.log", "tritonserver.log", "envoy.log"}, f"a part was started: {logs}"
