"""`llmesh serve <role>`: the command each role would exec, built without exec'ing it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from control import cli, serve
from control.envoy_config import EdgeConfig, render
from control.serve import DrainingEnvoy, parse_addresses, plan, requests_in_flight
from llmesh.addresses import parse_host_port


@pytest.mark.parametrize(
    ("role", "module"),
    [("gateway", "gateway"), ("router", "router"), ("cache", "cache_service"), ("limiter", "limiter_service")],
)
def test_service_roles_pass_every_argument_through(role: str, module: str) -> None:
    command = plan([role, "--port", "5", "--redis-url=redis://r:6379/0", "--help"], {"LLMESH_GATEWAY_PORT": "7"})
    assert command.argv == [sys.executable, "-m", module, "--port", "5", "--redis-url=redis://r:6379/0", "--help"]
    # The service's own env vars reach it; output is not block-buffered in a container's log.
    assert command.env["LLMESH_GATEWAY_PORT"] == "7"
    assert command.env["PYTHONUNBUFFERED"] == "1"


def _cli_exec(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> serve.Exec:
    ran: list[serve.Exec] = []
    monkeypatch.setattr(serve.Exec, "run", lambda self: ran.append(self))
    cli.main(argv)
    assert len(ran) == 1
    return ran[0]


def test_cli_hands_serve_arguments_over_unparsed(monkeypatch: pytest.MonkeyPatch) -> None:
    command = _cli_exec(monkeypatch, ["serve", "limiter", "--port", "50053", "--unknown-to-llmesh"])
    assert command.argv[1:] == ["-m", "limiter_service", "--port", "50053", "--unknown-to-llmesh"]


def test_unknown_role_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        plan(["frontend"], {})
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def _flag_value(argv: list[str], flag: str) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(flag + "=")]
    assert len(values) == 1, (flag, argv)
    return values[0]


def test_triton(tmp_path: Path) -> None:
    backends = tmp_path / "backends"
    command = plan(
        ["triton", "--model-repository", str(tmp_path), "--grpc-port", "9001", "--backend-dir", str(backends)], {}
    )
    argv = command.argv
    assert argv[0].endswith("/tritonserver")
    assert _flag_value(argv, "--model-repository") == str(tmp_path)
    assert _flag_value(argv, "--backend-directory") == str(backends)
    # In a container the endpoints listen on every address by default; the other ports keep Triton's defaults.
    assert _flag_value(argv, "--grpc-address") == "0.0.0.0"
    assert (_flag_value(argv, "--grpc-port"), _flag_value(argv, "--http-port")) == ("9001", "8000")
    assert _flag_value(argv, "--metrics-port") == "8002"
    assert "--backend-config=python,shm-region-prefix-name=llmesh-triton-9001-" in argv
    assert not any(a.startswith("--grpc-use-ssl") for a in argv)
    assert command.env["LD_LIBRARY_PATH"].split(":")[0].endswith("nvidia_pytriton.libs")
    assert command.env["PATH"].split(":")[0] == str(Path(sys.executable).parent)


def test_triton_from_env_with_mutual_tls(tmp_path: Path) -> None:
    tls = tmp_path / "tls"
    tls.mkdir()
    for name in ("ca.pem", "triton.pem", "triton.key"):
        (tls / name).write_text("x")
    env = {
        "LLMESH_SERVE_MODEL_REPOSITORY": str(tmp_path),
        "LLMESH_SERVE_HOST": "127.0.0.1",
        "LLMESH_SERVE_TLS_DIR": str(tls),
        "LLMESH_SERVE_BACKEND_DIR": str(tmp_path / "b"),
    }
    argv = plan(["triton"], env).argv
    assert _flag_value(argv, "--model-repository") == str(tmp_path)
    assert _flag_value(argv, "--http-address") == "127.0.0.1"
    assert "--allow-http=false" in argv
    assert "--grpc-use-ssl-mutual=true" in argv
    assert _flag_value(argv, "--grpc-server-cert") == str(tls / "triton.pem")
    assert _flag_value(argv, "--grpc-root-cert") == str(tls / "ca.pem")


def test_triton_refuses_what_cannot_work(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        plan(["triton"], {})  # no repository
    with pytest.raises(ValueError, match="no such folder"):
        plan(["triton", "--model-repository", str(tmp_path / "missing"), "--backend-dir", str(tmp_path)], {})
    with pytest.raises(ValueError, match=r"--tls-dir lacks: .*triton\.key"):
        plan(["triton", "--model-repository", str(tmp_path), "--backend-dir", str(tmp_path), "--tls-dir", "/nope"], {})


def _clusters(config_text: str) -> dict[str, dict]:  # type: ignore[type-arg]
    return {c["name"]: c for c in yaml.safe_load(config_text)["static_resources"]["clusters"]}


def test_envoy_renders_into_config_dir(tmp_path: Path) -> None:
    command = plan(
        [
            "envoy",
            "--gateways",
            "gateway-0.gateway:50051,10.0.0.7:50051",
            "--limiter",
            "10.0.0.9:50053",
            "--port",
            "8443",
            "--config-dir",
            str(tmp_path),
            "--edge-max-connections",
            "77",
            "--log-level",
            "info",
        ],
        {},
    )
    config_path = Path(command.argv[command.argv.index("-c") + 1])
    assert config_path.parent.parent == tmp_path
    assert Path(command.argv[0]).name == "envoy"
    assert command.argv[command.argv.index("--log-level") + 1] == "info"
    config = yaml.safe_load(config_path.read_text())
    listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener == {"address": "0.0.0.0", "port_value": 8443}
    assert config["overload_manager"]["resource_monitors"][0]["typed_config"]["max_active_downstream_connections"] == 77
    clusters = _clusters(config_path.read_text())
    assert clusters["gateway"]["type"] == "STRICT_DNS"
    assert clusters["gateway"]["dns_lookup_family"] == "V4_PREFERRED"
    hosts = [
        e["endpoint"]["address"]["socket_address"]
        for e in clusters["gateway"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert hosts == [
        {"address": "gateway-0.gateway", "port_value": 50051},
        {"address": "10.0.0.7", "port_value": 50051},
    ]
    assert clusters["limiter"]["type"] == "STATIC"
    assert "dns_lookup_family" not in clusters["limiter"]
    # As `llmesh up`: the per-address connection budget is on (EdgeSettings' default).
    assert "envoy.filters.network.ratelimit" in config_path.read_text()


def test_envoy_from_env_with_upstream_tls(tmp_path: Path) -> None:
    tls = tmp_path / "tls"
    tls.mkdir()
    for name in ("ca.pem", "envoy.pem", "envoy.key"):
        (tls / name).write_text("x")
    env = {
        "LLMESH_SERVE_GATEWAYS": "127.0.0.1:1",
        "LLMESH_SERVE_LIMITER": "limiter.mesh.svc:50053",
        "LLMESH_SERVE_UPSTREAM_TLS_DIR": str(tls),
        "LLMESH_SERVE_CONFIG_DIR": str(tmp_path),
    }
    command = plan(["envoy"], env)
    text = Path(command.argv[command.argv.index("-c") + 1]).read_text()
    clusters = _clusters(text)
    assert clusters["gateway"]["type"] == "STATIC"
    assert clusters["limiter"]["type"] == "STRICT_DNS"
    tls_context = clusters["gateway"]["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls_context["tls_certificates"][0]["certificate_chain"]["filename"] == str(tls / "envoy.pem")
    with pytest.raises(ValueError, match="--upstream-tls-dir lacks"):
        plan(["envoy", "--upstream-tls-dir", str(tmp_path)], env)


def test_envoy_needs_gateways_and_limiter(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        plan(["envoy", "--limiter", "127.0.0.1:1", "--config-dir", str(tmp_path)], {})
    with pytest.raises(ValueError, match="not HOST:PORT"):
        plan(["envoy", "--gateways", "gateway", "--limiter", "127.0.0.1:1", "--config-dir", str(tmp_path)], {})


def test_parse_host_port() -> None:
    assert parse_host_port("gateway.mesh.svc.cluster.local:50051") == ("gateway.mesh.svc.cluster.local", 50051)
    assert parse_host_port("[::1]:8080") == ("::1", 8080)
    assert parse_addresses("a:1, b:2,") == (("a", 1), ("b", 2))
    for bad in ("a", "a:", ":1", "a:0", "a:65536", "a:x", "::1:80", "[nope]:80"):
        with pytest.raises(ValueError):
            parse_host_port(bad)
    with pytest.raises(ValueError):
        parse_addresses(" , ")


def test_ip_literals_keep_static_clusters() -> None:
    clusters = _clusters(render(EdgeConfig(gateways=(("127.0.0.1", 1), ("::1", 2)), limiter=("10.1.2.3", 3))))
    assert {c["type"] for c in clusters.values()} == {"STATIC"}
    assert all("dns_lookup_family" not in c for c in clusters.values())


def test_envoy_is_drained_not_exec_ed(tmp_path: Path) -> None:
    command = plan(
        ["envoy", "--gateways", "127.0.0.1:1", "--limiter", "127.0.0.1:2", "--config-dir", str(tmp_path),
         "--admin-port", "9911", "--drain-s", "12"],
        {},
    )  # fmt: skip
    assert isinstance(command, DrainingEnvoy) and command.admin_port == 9911 and command.drain_s == 12
    assert command.argv[-4:] == ["--drain-strategy", "immediate", "--drain-time-s", "12"]


def test_requests_in_flight_counts_every_listener_but_the_admin() -> None:
    stats = (
        "http.ingress_http.downstream_rq_active: 3\n"
        "http.grpc_json.downstream_rq_active: 2\n"
        "http.admin.downstream_rq_active: 1\n"
        "http.ingress_http.downstream_rq_total: 99\n"
        "cluster.gateway.upstream_rq_active: 7\n"
    )
    assert requests_in_flight(stats) == 5
    assert requests_in_flight("") == 0
