"""The rendered edge config is accepted by the real Envoy binary (`envoy --mode validate`): plaintext, with TLS at
the edge, with the per-address connection budget, and with every edge limit set; bad edge settings are refused
before Envoy sees them."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from control.envoy_config import EdgeConfig, EdgeSettings, envoy_command, render
from tests.fixtures.edge import write_server_certificate


def validate(config_text: str, folder: Path) -> str:
    config = folder / "envoy.yaml"
    config.write_text(config_text)
    envoy = str(Path(sys.executable).parent / "envoy")
    argv = [envoy, *envoy_command(config)[1:], "--mode", "validate"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr
    return config_text


def listener(config_text: str) -> dict:  # type: ignore[type-arg]
    return yaml.safe_load(config_text)["static_resources"]["listeners"][0]  # type: ignore[no-any-return]


def hcm(config_text: str) -> dict:  # type: ignore[type-arg]
    return listener(config_text)["filter_chains"][0]["filters"][-1]["typed_config"]  # type: ignore[no-any-return]


def edge_config(**edge: object) -> EdgeConfig:
    return EdgeConfig(
        listen_port=18080,
        admin_port=19901,
        gateways=(("127.0.0.1", 1), ("127.0.0.1", 2)),
        edge=dataclasses.replace(EdgeSettings(), **edge),  # type: ignore[arg-type]
    )


def test_envoy_validates_rendered_config(tmp_path: Path) -> None:
    text = validate(
        render(EdgeConfig(listen_port=18080, admin_port=19901, gateways=(("127.0.0.1", 1), ("127.0.0.1", 2)))),
        tmp_path,
    )
    chain = listener(text)["filter_chains"][0]
    assert "transport_socket" not in chain
    assert [f["name"] for f in chain["filters"]] == ["envoy.filters.network.http_connection_manager"]


def test_envoy_validates_tls_and_limits(tmp_path: Path) -> None:
    cert, key, _ = write_server_certificate(tmp_path)
    text = validate(
        render(
            edge_config(
                tls_cert=cert,
                tls_key=key,
                max_request_body_bytes=1000,
                max_request_headers_kb=8,
                request_headers_timeout_s=1.5,
                request_body_timeout_s=2,
                idle_timeout_s=3,
                stream_idle_timeout_s=4,
                request_timeout_s=50,
                per_ip_connection_budget=True,
            )
        ),
        tmp_path,
    )
    chain = listener(text)["filter_chains"][0]
    tls = chain["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["alpn_protocols"] == ["h2", "http/1.1"]
    assert tls["tls_certificates"][0]["certificate_chain"]["filename"] == str(cert.resolve())
    ratelimit, manager = chain["filters"]
    assert ratelimit["name"] == "envoy.filters.network.ratelimit"
    assert ratelimit["typed_config"]["descriptors"][0]["entries"][0]["key"] == "remote_address"
    assert manager["typed_config"]["request_headers_timeout"] == "1.5s"
    assert manager["typed_config"]["request_timeout"] == "2s"
    assert manager["typed_config"]["common_http_protocol_options"]["idle_timeout"] == "3s"
    assert manager["typed_config"]["stream_idle_timeout"] == "4s"
    assert manager["typed_config"]["max_request_headers_kb"] == 8
    filters = {f["name"]: f["typed_config"] for f in manager["typed_config"]["http_filters"]}
    transcoder = filters["envoy.filters.http.grpc_json_transcoder"]
    assert transcoder["max_request_body_size"] == 1000
    routes = manager["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    # Token streaming keeps the stream idle timeout; every other gateway route waits as long as a whole request.
    assert routes[0]["match"]["path"] == "/llmesh.v1.ChatService/StreamChatCompletion"
    assert "idle_timeout" not in routes[0]["route"]
    assert routes[1]["route"]["idle_timeout"] == routes[1]["route"]["timeout"] == "50s"


def test_mesh_defaults_validate(tmp_path: Path) -> None:
    """What `llmesh up` renders by default (the connection budget on), accepted by Envoy."""
    from control.launcher import MeshSettings

    text = validate(render(EdgeConfig(edge=MeshSettings().edge)), tmp_path)
    assert hcm(text)["stream_idle_timeout"] == "60s"
    assert listener(text)["filter_chains"][0]["filters"][0]["name"] == "envoy.filters.network.ratelimit"


@pytest.mark.parametrize(
    ("edge", "message"),
    [
        ({"tls_cert": Path("cert.pem")}, "--tls-cert and --tls-key go together"),
        ({"tls_cert": Path("/nonexistent/cert.pem"), "tls_key": Path("/nonexistent/key.pem")}, "no such file"),
        ({"request_body_timeout_s": 0}, "--edge-request-body-timeout-s must be at least 0.001"),
        ({"max_request_body_bytes": -1}, "--edge-max-request-body-bytes must be positive"),
        ({"max_request_headers_kb": 9000}, "at most 8192"),
        ({"stream_idle_timeout_s": 400}, "cannot be longer than --edge-request-timeout-s"),
    ],
)
def test_bad_edge_settings_are_refused_with_the_flag(edge: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render(edge_config(**edge))
