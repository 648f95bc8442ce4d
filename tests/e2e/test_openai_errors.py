"""Errors through the real Envoy: OpenAI's error shape on HTTP/JSON (curl-like and through the openai SDK), a gRPC
status with a message for gRPC callers, and Envoy's own errors (no route, no gateway) in the same shape."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from control.envoy_config import EdgeConfig, envoy_command, render
from control.process import ManagedProcess, free_ports, http_ok_probe
from llmesh.v1 import chat_pb2, chat_pb2_grpc, common_pb2
from tests.fixtures.mesh import RunningMesh

HI = [{"role": "user", "content": "hi"}]


def assert_openai_error(reply: httpx.Response, status: int, kind: str) -> dict[str, object]:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    assert "x-llmesh-error" not in reply.headers and "grpc-message" not in reply.headers
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == kind
    assert isinstance(error["message"], str) and error["message"]
    return error  # type: ignore[no-any-return]


def post(mesh: RunningMesh, key: str | None, payload: object, path: str = "/v1/chat/completions") -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{mesh.http_base}{path}", json=payload, headers=headers, timeout=60)


@pytest.mark.parametrize("stream", [False, True])
def test_invalid_request_is_400_in_openai_shape(mesh: RunningMesh, paid_key: str, stream: bool) -> None:
    error = assert_openai_error(
        post(mesh, paid_key, {"messages": HI, "temperature": 9, "stream": stream}), 400, "invalid_request_error"
    )
    assert error["param"] == "temperature" and "temperature" in str(error["message"])


def test_hostile_values_are_400_quoting_a_short_prefix(mesh: RunningMesh, paid_key: str) -> None:
    reply = post(mesh, paid_key, {"messages": [{"role": "r" * 100_000, "content": "hi"}]})
    error = assert_openai_error(reply, 400, "invalid_request_error")
    assert error["param"] == "messages[0].role" and len(str(error["message"])) < 200
    raw = b'{"messages": [{"role": "user", "content": "\\ud800"}], "seed": ' + b"9" * 5000 + b"}"
    reply = httpx.post(
        f"{mesh.http_base}/v1/chat/completions",
        content=raw,
        headers={"authorization": f"Bearer {paid_key}", "content-type": "application/json"},
        timeout=60,
    )
    assert_openai_error(reply, 400, "invalid_request_error")


def test_openai_nulls_mean_default(mesh: RunningMesh, paid_key: str) -> None:
    payload = {
        "messages": [{"role": "user", "content": "Say hi.", "name": None}],
        "max_tokens": 3,
        **dict.fromkeys(["stop", "user", "stream_options", "temperature", "n", "seed", "top_p", "tools", "metadata"]),
    }
    reply = post(mesh, paid_key, payload)
    assert reply.status_code == 200, reply.text


def test_auth_errors_are_401_in_openai_shape(mesh: RunningMesh) -> None:
    error = assert_openai_error(post(mesh, None, {"messages": HI}), 401, "authentication_error")
    assert "API key" in str(error["message"])
    reply = httpx.get(f"{mesh.http_base}/v1/models", headers={"authorization": "Bearer lm-wrong"}, timeout=30)
    assert_openai_error(reply, 401, "authentication_error")


def test_typed_route_errors_are_openai_shaped(mesh: RunningMesh, paid_key: str) -> None:
    # The gateway's refusal, and the transcoder's own (JSON it cannot map onto the message).
    assert_openai_error(
        post(mesh, paid_key, {"messages": []}, "/v1/llmesh/chat/completions"), 400, "invalid_request_error"
    )
    reply = httpx.post(
        f"{mesh.http_base}/v1/llmesh/chat/completions:stream",
        content=b'{"max_tokens": "many"}',
        headers={"authorization": f"Bearer {paid_key}", "content-type": "application/json"},
        timeout=30,
    )
    error = assert_openai_error(reply, 400, "invalid_request_error")
    assert "max_tokens" in str(error["message"])


@pytest.mark.parametrize(("method", "path"), [("GET", "/v2/nothing"), ("GET", "/v1/chat/completions")])
def test_unknown_route_is_404_in_openai_shape(mesh: RunningMesh, method: str, path: str) -> None:
    reply = httpx.request(method, f"{mesh.http_base}{path}", timeout=30)
    error = assert_openai_error(reply, 404, "not_found_error")
    assert "POST /v1/chat/completions" in str(error["message"])


def test_openai_sdk_exceptions_carry_the_message(mesh: RunningMesh, paid_key: str) -> None:
    client = openai.OpenAI(base_url=f"{mesh.http_base}/v1", api_key=paid_key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}], top_p=0)
    assert "top_p" in bad.value.message and bad.value.param == "top_p"
    assert bad.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}], extra_body={"x": 1})
    assert unknown.value.code == "unknown_parameter" and "'x'" in unknown.value.message
    with pytest.raises(openai.BadRequestError) as streaming:
        client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "hi"}], max_tokens=0, stream=True
        )
    assert "max_tokens" in streaming.value.message
    anonymous = openai.OpenAI(base_url=f"{mesh.http_base}/v1", api_key="lm-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as auth:
        anonymous.models.list()
    assert "invalid API key" in auth.value.message


def test_grpc_callers_get_status_and_message(mesh: RunningMesh, paid_key: str) -> None:
    request = chat_pb2.ChatCompletionRequest(
        model="m" * 10_000, messages=[common_pb2.ChatMessage(role="user", content="hi")]
    )
    with grpc.insecure_channel(mesh.grpc_target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.CreateChatCompletion(request, metadata=[("authorization", f"Bearer {paid_key}")], timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == "model is 10000 characters long; the limit is 256"
    assert "x-llmesh-error" not in {m.key for m in refused.value.trailing_metadata() or ()}


@pytest.fixture(scope="module")
def envoy_without_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The edge alone, its gateway and limiter ports closed: Envoy's own 503s."""
    listen, admin, gateway, limiter = free_ports(4)
    folder = tmp_path_factory.mktemp("envoy-alone")
    config = folder / "envoy.yaml"
    config.write_text(
        render(
            EdgeConfig(
                listen_port=listen,
                admin_port=admin,
                gateways=(("127.0.0.1", gateway),),
                limiter=("127.0.0.1", limiter),
                health_interval_s=60,
            )
        )
    )
    envoy = str(Path(sys.executable).parent / "envoy")
    proc = ManagedProcess("envoy", [envoy, *envoy_command(config)[1:]], folder / "envoy.log").start()
    try:
        proc.wait_ready(http_ok_probe(f"http://127.0.0.1:{admin}/ready"), timeout=60)
        yield f"127.0.0.1:{listen}"
    finally:
        proc.stop()


def test_no_gateway_is_503_in_openai_shape_without_detail(envoy_without_gateway: str) -> None:
    reply = httpx.post(
        f"http://{envoy_without_gateway}/v1/chat/completions",
        json={"messages": HI},
        headers={"authorization": "Bearer lm-any"},
        timeout=30,
    )
    error = assert_openai_error(reply, 503, "service_unavailable_error")
    assert "retry" in str(error["message"]) and "upstream" not in str(error["message"])
    with grpc.insecure_channel(envoy_without_gateway) as channel, pytest.raises(grpc.RpcError) as down:
        chat_pb2_grpc.ChatServiceStub(channel).ListModels(chat_pb2.ListModelsRequest(), timeout=30)
    assert down.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"xxxx",
        b"\x00\x00\x00\x00\x09abc",
        b"\x02\x00\x00\x00\x00",
        b"\x01\x00\x00\x00\x00",
        b"\x00" * 5 + b"\x00" * 5,
    ],
)
@pytest.mark.parametrize("path", ["/llmesh.v1.ChatService/CreateChatCompletion", "/v1/chat/completions"])
def test_malformed_grpc_framing_is_invalid_argument(mesh: RunningMesh, paid_key: str, body: bytes, path: str) -> None:
    """What no gRPC library sends but a hand-made client can: a body that is not one length-prefixed message."""
    reply = httpx.post(
        f"{mesh.http_base}{path}",
        content=body,
        headers={"content-type": "application/grpc", "te": "trailers", "authorization": f"Bearer {paid_key}"},
        timeout=30,
    )
    assert reply.status_code == 200
    assert reply.headers["grpc-status"] == "3", reply.headers
    assert reply.headers["grpc-message"].startswith("malformed gRPC request")


def test_well_framed_grpc_over_http1_reaches_the_gateway(mesh: RunningMesh, paid_key: str) -> None:
    reply = httpx.post(
        f"{mesh.http_base}/llmesh.v1.ChatService/CreateChatCompletion",
        content=b"\x00\x00\x00\x00\x00",  # one empty ChatCompletionRequest
        headers={"content-type": "application/grpc", "te": "trailers", "authorization": f"Bearer {paid_key}"},
        timeout=30,
    )
    assert reply.headers["grpc-status"] == "3" and "at least one message" in reply.headers["grpc-message"]


def test_large_headers_within_the_edge_limit_reach_the_gateway(mesh: RunningMesh) -> None:
    # 20 KiB: under Envoy's header limit, over gRPC's default 16 KiB metadata limit (which answered 429).
    reply = httpx.post(
        f"{mesh.http_base}/v1/chat/completions",
        json={"messages": HI},
        headers={"authorization": "Bearer lm-" + "k" * 20_000},
        timeout=30,
    )
    assert_openai_error(reply, 401, "authentication_error")
