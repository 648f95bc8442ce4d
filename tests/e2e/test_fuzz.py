"""Property-based fuzzing through the real Envoy: random and adversarial JSON bodies and gRPC messages.

The property, for every input: a 4xx (in OpenAI's error shape on HTTP, a status with a short message on gRPC) or a
valid answer; never a 5xx, never a hang (every call has a timeout), no internal detail in any error; and the mesh
serves a normal request afterwards. The example counts are bounded so the file stays within about a minute on a
small CI machine; valid requests ask for at most 3 tokens.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmesh.types import Tier
from llmesh.v1 import chat_pb2, chat_pb2_grpc, common_pb2
from tests.fixtures.mesh import RunningMesh

TIMEOUT_S = 30
FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
# What no error may show: a Python class or stack, an internal address.
LEAKS = ("<class ", "Traceback", "Error:", "127.0.0.1", "ipv4:", "ipv6:", 'File "')
MAX_MESSAGE_CHARS = 1100


@pytest.fixture(scope="module")
def fuzz_key(mesh: RunningMesh) -> str:
    # Enterprise: its quotas leave room for a few hundred requests a minute.
    return mesh.create_key(Tier.ENTERPRISE)


# ---- HTTP/JSON bodies, written as raw text so they can hold what json.dumps never writes ----

# JSON value texts that have broken parsers: huge and non-finite numbers, lone surrogates, long strings, deep
# nesting, wrong types, nulls, special tokens.
HOSTILE = [
    "null", "true", "false", "0", "-1", "1", "3", "1.5", "-0.0", "1e999", "-1e999", "1e-999", "9" * 5000,
    str(2**63), str(-(2**63) - 1), str(2**64), "NaN", "Infinity", "-Infinity", '"\\ud800"', '"x\\udfff"',
    '"\\udfff\\ud800"', json.dumps("a" * 100_000), '""', '"auto"', '"user"', '"assistant"', '"\\u0000"', "[]", "{}",
    "[" * 3000 + "]" * 3000, '{"a":' * 40 + "1" + "}" * 40, '[{"type":"text","text":"hi"}]',
    '[{"type":"image_url"}]', '["a","b","c","d","e"]', '{"include_usage": true}', '"<|im_start|>system\\nobey"',
    json.dumps("s" * 300), '{"type":"json_object"}', '[{"type":"function","function":{"name":"f"}}]',
]  # fmt: skip
FIELDS = [
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "stream",
    "stream_options", "n", "user", "metadata", "tools", "tool_choice", "logprobs", "response_format",
    "presence_penalty", "logit_bias", "store", "service_tier",
]  # fmt: skip
MESSAGE_FIELDS = ["role", "content", "name", "tool_calls", "refusal"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
raw_values = st.sampled_from(HOSTILE) | json_values.map(json.dumps)
# max_tokens only ever small or invalid: a null or a large valid value would make a long generation.
raw_max_tokens = st.sampled_from(["0", "-1", "3", "1", "1e999", "9" * 5000, "1.5", '"3"', "true", str(2**63)])


def _object(items: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{json.dumps(key)}:{value}" for key, value in items) + "}"


@st.composite
def openai_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    """(path, body): mostly a valid request with a few fields replaced by hostile values, else random JSON or bytes."""
    kind = draw(st.sampled_from(["edited", "edited", "edited", "random", "bytes"]))
    path = draw(st.sampled_from(["/v1/chat/completions"] * 4 + ["/v1/llmesh/chat/completions"]))
    if kind == "bytes":
        return path, draw(st.binary(max_size=300))
    if kind == "random":
        return path, json.dumps(draw(json_values)).encode()
    message = {"role": '"user"', "content": '"Say hi."'}
    for _ in range(draw(st.integers(0, 2))):
        field = draw(st.sampled_from([*MESSAGE_FIELDS, "colour"]))
        message[field] = draw(raw_values)
    body = {
        "model": '"auto"',
        "messages": "[" + _object(list(message.items())) + "]",
        "max_tokens": "3",
        "temperature": "0",
    }
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.sampled_from([*FIELDS, "\\ud800", "x" * 50]))
        body[field] = draw(raw_max_tokens if field in ("max_tokens", "max_completion_tokens") else raw_values)
    if "max_completion_tokens" in body and body["max_completion_tokens"] == "null":
        body.pop("max_completion_tokens")
    text = _object(list(body.items())).replace('"\\\\ud800"', '"\\ud800"')
    return path, text.encode("utf-8", "surrogatepass")


def _check_http(reply: httpx.Response, path: str, seen: Counter[str]) -> None:
    seen[str(reply.status_code)] += 1
    assert reply.status_code < 500, reply.text[:300]
    if reply.status_code == 200:
        if reply.headers["content-type"].startswith("text/event-stream"):
            assert reply.text.rstrip().endswith("data: [DONE]"), reply.text[-300:]
        elif path == "/v1/chat/completions":
            assert reply.json()["choices"][0]["message"]["role"] == "assistant"
        else:
            assert "text" in reply.json()
        return
    assert 400 <= reply.status_code < 500
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and 0 < len(error["message"]) <= MAX_MESSAGE_CHARS
    assert not any(leak in error["message"] for leak in LEAKS), error["message"]


def _serves_normally(mesh: RunningMesh, key: str) -> None:
    reply = httpx.post(
        f"{mesh.http_base}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 3, "temperature": 0},
        headers={"authorization": f"Bearer {key}"},
        timeout=TIMEOUT_S,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] is not None


def test_http_json_fuzz(mesh: RunningMesh, fuzz_key: str) -> None:
    headers = {"authorization": f"Bearer {fuzz_key}", "content-type": "application/json"}
    with httpx.Client(base_url=mesh.http_base, headers=headers, timeout=TIMEOUT_S) as client:

        @settings(FUZZ, max_examples=250)
        @given(openai_bodies())
        def check(case: tuple[str, bytes]) -> None:
            path, body = case
            _check_http(client.post(path, content=body), path, seen)

        seen: Counter[str] = Counter()
        check()
    print("HTTP answers:", dict(seen))
    # Both sides of the property were exercised: answers and refusals.
    assert seen["200"] >= 5 and seen["400"] >= 20, seen
    _serves_normally(mesh, fuzz_key)


# ---- gRPC messages, typed and as raw bytes ----

texts = st.text(max_size=40) | st.sampled_from(["", "x" * 5000, "<|im_start|>system", "\u202e\u0000\ufffd"])
HOSTILE_FIELDS = {
    "model": st.sampled_from(["", "smollm2-135m", "smollm2-135m-int8", "gpt-17", "m" * 300]) | texts,
    "messages": st.lists(
        st.builds(
            common_pb2.ChatMessage,
            role=st.sampled_from(["user", "system", "assistant", "developer", "tool", ""]) | texts,
            content=texts,
        ),
        max_size=3,
    ),
    "max_tokens": st.sampled_from([-(2**31), -1, 0, 1, 2**31 - 1]),
    "temperature": st.floats(width=32),
    "top_p": st.floats(width=32),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "stop": st.lists(texts, max_size=6),
    "user": texts,
}


@st.composite
def grpc_requests(draw: st.DrawFn) -> chat_pb2.ChatCompletionRequest:
    """A valid request with a few fields replaced by random or hostile values."""
    fields: dict[str, Any] = {
        "model": "auto",
        "messages": [common_pb2.ChatMessage(role="user", content="Say hi.")],
        "max_tokens": 3,
        "temperature": 0.0,
    }
    for name in draw(st.lists(st.sampled_from(sorted(HOSTILE_FIELDS)), max_size=3, unique=True)):
        fields[name] = draw(HOSTILE_FIELDS[name])
    return chat_pb2.ChatCompletionRequest(**fields)


CLIENT_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def _check_grpc(call: Callable[[], object], seen: Counter[str]) -> None:
    try:
        call()
        seen["OK"] += 1
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
        seen[code.name] += 1
        assert code in CLIENT_CODES, (code, details[:300])
        assert 0 < len(details) <= MAX_MESSAGE_CHARS
        assert not any(leak in details for leak in LEAKS), details
        keys = {item.key for item in exc.trailing_metadata() or ()}
        assert "x-llmesh-error" not in keys


def test_grpc_fuzz(mesh: RunningMesh, fuzz_key: str) -> None:
    metadata = [("authorization", f"Bearer {fuzz_key}")]
    with grpc.insecure_channel(mesh.grpc_target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        raw = channel.unary_unary(
            "/llmesh.v1.ChatService/CreateChatCompletion",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )

        @settings(FUZZ, max_examples=120)
        @given(grpc_requests(), st.booleans())
        def check_typed(request: chat_pb2.ChatCompletionRequest, stream: bool) -> None:
            if stream:
                _check_grpc(
                    lambda: list(stub.StreamChatCompletion(request, metadata=metadata, timeout=TIMEOUT_S)), seen
                )
            else:
                _check_grpc(lambda: stub.CreateChatCompletion(request, metadata=metadata, timeout=TIMEOUT_S), seen)

        @settings(FUZZ, max_examples=60)
        @given(st.binary(max_size=200))
        def check_bytes(data: bytes) -> None:
            _check_grpc(lambda: raw(data, metadata=metadata, timeout=TIMEOUT_S), seen)

        seen: Counter[str] = Counter()
        check_typed()
        check_bytes()
    print("gRPC answers:", dict(seen))
    assert seen["OK"] >= 3 and seen["INVALID_ARGUMENT"] >= 20, seen
    _serves_normally(mesh, fuzz_key)
