"""End to end through Envoy: HTTP/JSON (curl-like and the openai SDK), gRPC stubs, reflection, auth, bad input."""

from __future__ import annotations

import json

import grpc
import httpx
import openai
import pytest

from llmesh.v1 import chat_pb2, chat_pb2_grpc, common_pb2
from tests.fixtures.mesh import RunningMesh

QUESTION = "What is the capital of France? Answer in one sentence."


def post_chat(mesh: RunningMesh, key: str | None, payload: object, raw: bytes | None = None) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    content = raw if raw is not None else json.dumps(payload).encode()
    return httpx.post(f"{mesh.http_base}/v1/chat/completions", content=content, headers=headers, timeout=120)


def test_curl_style_chat_completion(mesh: RunningMesh, paid_key: str) -> None:
    reply = post_chat(
        mesh,
        paid_key,
        {"model": "auto", "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 40},
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    text = body["choices"][0]["message"]["content"]
    assert "Paris" in text
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 5 and 0 < usage["completion_tokens"] <= 40
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert body["llmesh_route"]["variant"] == body["model"]
    assert body["llmesh_route"]["reason"]


def test_openai_sdk_streams_chunk_by_chunk(mesh: RunningMesh, paid_key: str) -> None:
    client = openai.OpenAI(base_url=f"{mesh.http_base}/v1", api_key=paid_key, max_retries=0)
    stream = client.chat.completions.create(
        model="auto",
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
    )
    deltas, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                deltas.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert len(deltas) > 3, deltas
    assert "Paris" in "".join(deltas)
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens >= len(deltas)


def test_openai_sdk_plain_and_models(mesh: RunningMesh, paid_key: str) -> None:
    client = openai.OpenAI(base_url=f"{mesh.http_base}/v1", api_key=paid_key, max_retries=0)
    reply = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=40
    )
    assert "Paris" in (reply.choices[0].message.content or "")
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "auto" and len(ids) >= 2


def test_same_seed_same_answer(mesh: RunningMesh, paid_key: str) -> None:
    payload = {
        "messages": [{"role": "user", "content": "Write a short poem about the sea."}],
        "temperature": 0.9,
        "seed": 1234,
        "max_tokens": 24,
    }
    first = post_chat(mesh, paid_key, payload).json()["choices"][0]["message"]["content"]
    second = post_chat(mesh, paid_key, payload).json()["choices"][0]["message"]["content"]
    assert first == second


def test_stop_string(mesh: RunningMesh, paid_key: str) -> None:
    payload = {
        "messages": [{"role": "user", "content": "Count from 1 to 20, separated by commas."}],
        "temperature": 0,
        "max_tokens": 80,
        "stop": ["7"],
    }
    reply = post_chat(mesh, paid_key, payload).json()
    text = reply["choices"][0]["message"]["content"]
    assert "7" not in text and "6" in text, text
    assert reply["choices"][0]["finish_reason"] == "stop"


def test_grpc_stub_streams_through_envoy(mesh: RunningMesh, paid_key: str) -> None:
    with grpc.insecure_channel(mesh.grpc_target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        request = chat_pb2.ChatCompletionRequest(
            messages=[common_pb2.ChatMessage(role="user", content=QUESTION)], temperature=0, max_tokens=40
        )
        chunks = list(
            stub.StreamChatCompletion(request, metadata=[("authorization", f"Bearer {paid_key}")], timeout=120)
        )
        assert chunks[0].route.variant and chunks[0].route.reason
        assert len([c for c in chunks if c.delta]) > 3
        assert "Paris" in "".join(c.delta for c in chunks)
        assert chunks[-1].finish_reason in ("stop", "length")
        assert chunks[-1].usage.completion_tokens > 0

        unary = stub.CreateChatCompletion(request, metadata=[("authorization", f"Bearer {paid_key}")], timeout=120)
        assert unary.text == "".join(c.delta for c in chunks)
        assert unary.model == chunks[0].route.variant


def test_typed_http_route(mesh: RunningMesh, paid_key: str) -> None:
    reply = httpx.post(
        f"{mesh.http_base}/v1/llmesh/chat/completions",
        json={"messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 16},
        headers={"authorization": f"Bearer {paid_key}"},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] > 0
    assert body["route"]["variant"]


def test_reflection_through_envoy(mesh: RunningMesh) -> None:
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(mesh.grpc_target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = database.get_services()
        assert "llmesh.v1.ChatService" in services
        pool = DescriptorPool(database)
        service = pool.FindServiceByName("llmesh.v1.ChatService")
        assert {"CreateChatCompletion", "StreamChatCompletion", "ListModels", "OpenAIChatCompletions"} <= set(
            service.methods_by_name
        )
        assert pool.FindMessageTypeByName("llmesh.v1.ChatCompletionRequest").fields_by_name["messages"]


def test_unknown_path_is_404(mesh: RunningMesh) -> None:
    reply = httpx.get(f"{mesh.http_base}/v2/nothing", timeout=10)
    assert reply.status_code == 404
    assert "not found" in reply.json()["error"]["message"]


@pytest.mark.parametrize("key", [None, "lm-not-a-real-key", ""])
def test_http_auth_errors_are_401(mesh: RunningMesh, key: str | None) -> None:
    headers = {} if key is None else {"authorization": f"Bearer {key}" if key else "Basic abc"}
    reply = httpx.post(
        f"{mesh.http_base}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}]},
        headers=headers,
        timeout=30,
    )
    assert reply.status_code == 401, reply.text
    assert "API key" in reply.text or "authorization" in reply.text
    assert httpx.get(f"{mesh.http_base}/v1/models", headers=headers, timeout=10).status_code == 401


def test_grpc_auth_errors(mesh: RunningMesh) -> None:
    with grpc.insecure_channel(mesh.grpc_target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        request = chat_pb2.ChatCompletionRequest(messages=[common_pb2.ChatMessage(role="user", content="hi")])
        with pytest.raises(grpc.RpcError) as missing:
            stub.CreateChatCompletion(request, timeout=30)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "missing API key" in (missing.value.details() or "")
        with pytest.raises(grpc.RpcError) as wrong:
            list(stub.StreamChatCompletion(request, metadata=[("authorization", "Bearer lm-wrong")], timeout=30))
        assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED


LONG_PROMPT = "word " * 5000

BAD_REQUESTS = [
    ({"messages": []}, "at least one message"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role is 'wizard'"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "at least 1"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, "at least 1"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, "at most"),
    ({"messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 8}, "context"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-17"}, "unknown model 'gpt-17'"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 7}, "temperature"),
]


@pytest.mark.parametrize(("payload", "message"), BAD_REQUESTS)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_input_is_400_with_message(
    mesh: RunningMesh, paid_key: str, payload: dict[str, object], message: str, stream: bool
) -> None:
    reply = post_chat(mesh, paid_key, {**payload, "stream": stream})
    assert reply.status_code == 400, reply.text
    assert message in reply.json()["error"]["message"]


def test_invalid_utf8_and_json_are_400(mesh: RunningMesh, paid_key: str) -> None:
    bad_utf8 = post_chat(mesh, paid_key, None, raw=b'{"messages": [{"role": "user", "content": "caf\xe9"}]}')
    assert bad_utf8.status_code == 400
    assert "UTF-8" in bad_utf8.text
    bad_json = post_chat(mesh, paid_key, None, raw=b'{"messages": [')
    assert bad_json.status_code == 400
    assert "not valid JSON" in bad_json.text


def test_grpc_bad_input_is_invalid_argument(mesh: RunningMesh, paid_key: str) -> None:
    metadata = [("authorization", f"Bearer {paid_key}")]
    with grpc.insecure_channel(mesh.grpc_target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        with pytest.raises(grpc.RpcError) as empty:
            stub.CreateChatCompletion(chat_pb2.ChatCompletionRequest(), metadata=metadata, timeout=30)
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "at least one message" in (empty.value.details() or "")

        # A string field holding invalid UTF-8, as a client with no UTF-8 check could send it:
        # field 2 (messages) -> ChatMessage{role="user", content=b"\xff"}.
        inner = b"\x0a\x04user" + b"\x12\x01\xff"
        raw = b"\x12" + bytes([len(inner)]) + inner
        call = channel.unary_unary(
            "/llmesh.v1.ChatService/CreateChatCompletion",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as utf8:
            call(raw, metadata=metadata, timeout=30)
        assert utf8.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "UTF-8" in (utf8.value.details() or "")


def test_mesh_still_serves_after_bad_input(mesh: RunningMesh, paid_key: str) -> None:
    for payload, _ in BAD_REQUESTS:
        post_chat(mesh, paid_key, payload)
    reply = post_chat(
        mesh, paid_key, {"messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 30}
    )
    assert reply.status_code == 200
    assert "Paris" in reply.json()["choices"][0]["message"]["content"]
    for name in ("router", "gateway", "envoy"):
        assert "Traceback" not in (mesh.log_dir / f"{name}.log").read_text(), name


def test_client_disconnect_cancels_generation_in_triton(mesh: RunningMesh, paid_key: str, triton_server) -> None:  # type: ignore[no-untyped-def]
    import time

    payload = {
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": 1000,
        "stream": True,
    }
    headers = {"authorization": f"Bearer {paid_key}", "content-type": "application/json"}
    request_id = None
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", f"{mesh.http_base}/v1/chat/completions", json=payload, headers=headers) as reply,
    ):
        assert reply.status_code == 200
        for n, line in enumerate(reply.iter_lines()):
            if line.startswith("data: {"):
                request_id = json.loads(line[len("data: ") :])["id"]
            if n > 8:
                break  # leaving the block closes the connection mid-stream
    assert request_id
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if f"request '{request_id}' cancelled after" in triton_server.log_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"Triton did not report cancelling {request_id}")
